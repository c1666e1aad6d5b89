"""The package keeps one home per concern (issue 16), checked on the source itself:

- no module of sae_vision/ is over about 500 lines, and no function over about 80, unless a
  `# long: <why>` comment says why (for a module: anywhere at its top level; for a function: on
  its `def` line or the line above it);
- no module (package, run.py, benchmarks, tests) imports or reaches into another module's
  private (`_name`) names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted((REPO / "sae_vision").glob("*.py"))
MAX_MODULE_LINES = 520  # "about 500"
MAX_FUNCTION_LINES = 80
OUR_MODULES = {p.stem for p in MODULES}


def _justified(lines: list[str], lineno: int) -> bool:
    """A `# long:` comment on the def line (1-based `lineno`), inside its signature, or above it."""
    window = lines[max(0, lineno - 2): lineno + 2]
    return any("# long:" in line for line in window)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_modules_and_functions_are_short_or_say_why(path):
    text = path.read_text()
    lines = text.splitlines()
    if len(lines) > MAX_MODULE_LINES:
        top = [ln for ln in lines if ln.startswith("# long:")]
        assert top, (f"{path.name} has {len(lines)} lines (> {MAX_MODULE_LINES}); split it or "
                     "say why with a top-level `# long:` comment")
    too_long = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            if n > MAX_FUNCTION_LINES and not _justified(lines, first):
                too_long.append(f"{node.name} ({n} lines)")
    assert not too_long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def _private_uses(path: Path) -> list[str]:
    """`from sae_vision.x import _y` and `x._y` where x is one of our modules."""
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sae_vision"):
            for a in node.names:
                if a.name.startswith("_"):
                    found.append(f"line {node.lineno}: from {node.module} import {a.name}")
                if a.name in OUR_MODULES:
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("sae_vision."):
                    aliases[a.asname or a.name.rsplit(".", 1)[1]] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    files = [*MODULES, REPO / "run.py", *sorted((REPO / "benchmarks").glob("*.py")),
             *sorted((REPO / "tests").glob("*.py"))]
    bad = {p.relative_to(REPO).as_posix(): u for p in files if (u := _private_uses(p))}
    assert not bad, f"private names used across modules: {bad}"


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The scanners are not vacuous: a planted private import and a long function are found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from sae_vision.io import _fsync\nfrom sae_vision import io\nio._remove(1)\n")
    assert len(_private_uses(bad)) == 2
    body = "\n".join(f"    x = {i}" for i in range(MAX_FUNCTION_LINES + 5))
    lines = f"def f():\n{body}\n".splitlines()
    assert not _justified(lines, 1)
    assert _justified(["# long: a table", *lines], 2)
