"""protocol/ must stay Sans-I/O: no sockets, TLS, event loops, threads, clocks, randomness or files.

Checked two ways: statically (every import statement and every call of a banned builtin in
the source) and dynamically (importing mailwire.protocol in a fresh interpreter loads none of
the banned modules).
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PROTOCOL = pathlib.Path(__file__).resolve().parent.parent / "protocol"
BANNED_MODULES = {
    "socket", "ssl", "asyncio", "trio", "anyio", "selectors", "select", "threading",
    "multiprocessing", "subprocess", "time", "random", "secrets", "os", "io", "pathlib",
    "shutil", "tempfile", "dns", "logging", "urllib", "http", "signal", "datetime",
}  # fmt: skip
BANNED_CALLS = {"open", "input", "print", "exec", "eval", "__import__", "breakpoint"}


def _sources() -> list[pathlib.Path]:
    files = sorted(PROTOCOL.glob("**/*.py"))
    assert files, "protocol/ has no sources?"
    return files


def violations(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in BANNED_CALLS:
                found.append(f"line {node.lineno}: call of {node.func.id}()")
            continue
        else:
            continue
        for name in names:
            if name.split(".")[0] in BANNED_MODULES:
                found.append(f"line {node.lineno}: import {name}")
    return found


@pytest.mark.parametrize("path", _sources(), ids=lambda p: p.name)
def test_protocol_module_does_no_io(path: pathlib.Path) -> None:
    assert violations(ast.parse(path.read_text(), str(path))) == []


@pytest.mark.parametrize(
    "source",
    ["import socket", "from time import monotonic", "import random as r", "x = open('f')",
     "from asyncio import sleep", "import dns.resolver"],
)  # fmt: skip
def test_checker_catches_planted_violations(source: str) -> None:
    assert violations(ast.parse(source)) != []


def test_importing_protocol_loads_no_io_module() -> None:
    code = (
        "import sys; before = set(sys.modules); import mailwire.protocol; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    # the interpreter itself preloads some (os, io); what matters is what protocol adds
    bad = {m for m in loaded if m.split(".")[0] in BANNED_MODULES - {"os", "io"}}
    assert bad == set()
