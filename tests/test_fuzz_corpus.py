"""Run every fuzz target's entry function over its corpus: keeps the targets alive and turns
every crash the fuzzers ever found (saved into fuzz/corpus/<target>/) into a regression test."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

import pytest

FUZZ = pathlib.Path(__file__).resolve().parent.parent / "fuzz"
TARGETS = sorted(FUZZ.glob("fuzz_*.py"))


def _load(path: pathlib.Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def _cases() -> list[tuple[pathlib.Path, pathlib.Path]]:
    cases: list[tuple[pathlib.Path, pathlib.Path]] = []
    for target in TARGETS:
        corpus = FUZZ / "corpus" / target.stem.removeprefix("fuzz_")
        cases.extend((target, seed) for seed in sorted(corpus.glob("*")))
    return cases


def test_every_target_has_a_corpus() -> None:
    assert TARGETS
    for target in TARGETS:
        corpus = FUZZ / "corpus" / target.stem.removeprefix("fuzz_")
        assert any(corpus.glob("*")), f"{target.name} has no seed corpus in {corpus}"


@pytest.mark.parametrize(
    ("target", "seed"), _cases(), ids=lambda p: f"{p.parent.name}/{p.name}" if p.is_file() else ""
)
def test_target_accepts_corpus_input(target: pathlib.Path, seed: pathlib.Path) -> None:
    _load(target).test_one_input(seed.read_bytes())
