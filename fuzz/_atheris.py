"""The entry point the fuzz targets share: ``python fuzz/fuzz_<name>.py CORPUS... [libFuzzer
options]`` runs atheris (libFuzzer) over the target's ``test_one_input``.

atheris is imported only here, only when a target runs as a program: the corpus replay test
(tests/test_fuzz_corpus.py) imports the targets without it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def fuzz(test_one_input: Callable[[bytes], None]) -> None:
    """Instrument every module imported so far (mailwire's among them) for coverage feedback,
    then fuzz ``test_one_input`` with the command line's corpora and options."""
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
