"""Every package under protocol/ and adapters/ is listed in pyproject (setuptools does not
recurse into an explicit package list: an unlisted sub-package is silently left out of the
wheel), and the installed package is the one under test."""

from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for import_name, directory in config["package-dir"].items():
        for init in (ROOT / directory).glob("**/__init__.py"):
            rel = init.parent.relative_to(ROOT / directory)
            found.add(".".join([import_name, *rel.parts]))
    assert found and found <= listed


def test_both_namespaces_import_and_carry_py_typed() -> None:
    import mailwire.adapters
    import mailwire.protocol

    for module in (mailwire.protocol, mailwire.adapters):
        assert module.__file__ is not None
        assert (pathlib.Path(module.__file__).parent / "py.typed").exists()


def test_public_api_is_deliberate() -> None:
    import mailwire.protocol

    assert sorted(mailwire.protocol.__all__) == sorted(
        name
        for name in dir(mailwire.protocol)
        if not name.startswith("_") and name not in {"annotations"}
    )
