"""The package keeps one home per concern (issue 16) and its folders show the pipeline
(issue 22), checked on the source itself:

- no module of sae_vision/ is over about 500 lines, and no function over about 80, unless a
  `# long: <why>` comment says why (for a module: anywhere at its top level; for a function: on
  its `def` line or the line above it);
- no module (package, run.py, benchmarks, tests) imports or reaches into another module's
  private (`_name`) names;
- no import circle, between modules (function-level imports included) or between packages;
- a module imports another package only through that package's `__init__` (its `__all__`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sae_vision"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
MAX_MODULE_LINES = 520  # "about 500"
MAX_FUNCTION_LINES = 80
OUR_MODULES = {p.stem for p in MODULES} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}


def _justified(lines: list[str], lineno: int) -> bool:
    """A `# long:` comment on the def line (1-based `lineno`), inside its signature, or above it."""
    window = lines[max(0, lineno - 2): lineno + 2]
    return any("# long:" in line for line in window)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
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
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                "sae_vision")):
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
             *sorted((REPO / "tests").rglob("*.py"))]
    bad = {p.relative_to(REPO).as_posix(): u for p in files if (u := _private_uses(p))}
    assert not bad, f"private names used across modules: {bad}"


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The scanners are not vacuous: a planted private import and a long function are found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from sae_vision.core.io import _fsync\nfrom sae_vision import io\nio._remove(1)\n")
    assert len(_private_uses(bad)) == 2
    body = "\n".join(f"    x = {i}" for i in range(MAX_FUNCTION_LINES + 5))
    lines = f"def f():\n{body}\n".splitlines()
    assert not _justified(lines, 1)
    assert _justified(["# long: a table", *lines], 2)


# --------------------------------------------------------------------------------------------
# Import circles and package surfaces


def _module_name(path: Path, root: Path) -> str:
    """Dotted name of a file under `root` (the folder holding the `sae_vision` package)."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(name: str) -> str | None:
    """`sae_vision.<pkg>` of a module name, or None for the top level and files outside it."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "sae_vision" and len(parts) > 2 else None


def _surfaces(root: Path) -> dict[str, dict[str, str]]:
    """Each subpackage's `__init__`: exported name -> the module that defines it."""
    out = {}
    for init in sorted((root / "sae_vision").glob("*/__init__.py")):
        pkg = _module_name(init, root)
        names: dict[str, str] = {}
        for node in ast.parse(init.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                for a in node.names:
                    names[a.asname or a.name] = (f"{pkg}.{node.module}" if node.module
                                                 else f"{pkg}.{a.name}")
        out[pkg] = names
    return out


def _imports(path: Path, root: Path) -> list[tuple[int, str, str]]:
    """(line, imported module as written, name) for every sae_vision import in a file, at any
    depth (a function-level import is still an edge); relative imports made absolute."""
    me = _module_name(path, root)
    base = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                up = base.split(".")[: len(base.split(".")) - node.level + 1]
                mod = ".".join([*up, node.module] if node.module else up)
            else:
                mod = node.module or ""
            if mod == "sae_vision" or mod.startswith("sae_vision."):
                out += [(node.lineno, mod, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, "") for a in node.names
                    if a.name.startswith("sae_vision.")]
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules it imports. An import through a package's surface is an edge to the
    module that defines the name, so a circle through an `__init__` is still a circle."""
    surfaces = _surfaces(root)
    files = sorted((root / "sae_vision").rglob("*.py"))
    known = {_module_name(p, root) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        if path.name == "__init__.py":
            continue
        me = _module_name(path, root)
        edges = graph.setdefault(me, set())
        for _, mod, name in _imports(path, root):
            if f"{mod}.{name}" in known:  # `from pkg import module`
                edges.add(f"{mod}.{name}")
            elif mod in surfaces:
                edges.add(surfaces[mod].get(name, mod))
            elif mod in known:
                edges.add(mod)
        edges.discard(me)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as [a, b, ..., a], or [] when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Subpackage -> the subpackages its modules import."""
    out: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        if (pkg := _package_of(mod)) is None:
            continue
        out.setdefault(pkg, set()).update(
            p for d in deps if (p := _package_of(d)) is not None and p != pkg)
    return out


def surface_violations(root: Path, extra: tuple[Path, ...] = ()) -> list[str]:
    """Imports that reach past another package's `__init__`: a module path inside it, or a name
    it does not export (`__all__`)."""
    surfaces = _surfaces(root)
    exported = {}
    for init in (root / "sae_vision").glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        exported[_module_name(init, root)] = {
            elt.value for node in tree.body if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
            for elt in node.value.elts}
    bad = []
    for path in [*sorted((root / "sae_vision").rglob("*.py")), *extra]:
        me = _module_name(path, root) if path.is_relative_to(root / "sae_vision") else path.name
        mine = _package_of(me) or (me if path.name == "__init__.py" else None)
        for line, mod, name in _imports(path, root):
            target = _package_of(mod) or (mod if mod in surfaces else None)
            if target is None or target == mine:
                continue
            where = f"{path.relative_to(root).as_posix()}:{line}"
            if mod != target:
                bad.append(f"{where} imports {mod}, inside {target}")
            elif name not in exported.get(target, set()):
                bad.append(f"{where} imports {name} from {target}, which does not export it")
    return bad


def test_no_import_circles_between_modules():
    cycle = find_cycle(import_graph(REPO))
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_no_import_circles_between_packages():
    cycle = find_cycle(package_graph(import_graph(REPO)))
    assert not cycle, "package circle: " + " -> ".join(cycle)


def test_packages_are_imported_only_through_their_surface():
    bad = surface_violations(REPO, extra=(REPO / "run.py",))
    assert not bad, "imports past a package's __init__:\n" + "\n".join(bad)


def test_every_surface_name_is_exported_and_defined():
    """`__all__` lists exactly what the `__init__` imports, so the surface check reads truth."""
    for pkg, names in _surfaces(REPO).items():
        init = REPO / Path(*pkg.split(".")) / "__init__.py"
        tree = ast.parse(init.read_text())
        all_ = next((node.value for node in tree.body if isinstance(node, ast.Assign)
                     and any(getattr(t, "id", "") == "__all__" for t in node.targets)), None)
        listed = set() if all_ is None else {e.value for e in all_.elts}
        assert listed == set(names), f"{pkg}: __all__ {sorted(listed)} != imports {sorted(names)}"
        assert ast.get_docstring(tree), f"{pkg}/__init__.py says nothing of what it owns"


def _plant(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_import_checks_catch_a_circle_and_a_reach_past_the_surface(tmp_path):
    """The graph checks are not vacuous: a planted module circle (through a surface, and in a
    function-level import), a package circle and a private cross-package import are found."""
    root = _plant(tmp_path, {
        "sae_vision/__init__.py": "",
        "sae_vision/a/__init__.py": '"""a"""\nfrom .x import f\n\n__all__ = ["f"]\n',
        "sae_vision/a/x.py": "from sae_vision.b import g\n\ndef f():\n    return g\n",
        "sae_vision/b/__init__.py": '"""b"""\nfrom .y import g\n\n__all__ = ["g"]\n',
        "sae_vision/b/y.py": "def g():\n    from sae_vision.a import f\n    return f\n",
        "sae_vision/b/z.py": "from sae_vision.a.x import f\nfrom sae_vision.a import h\n",
    })
    graph = import_graph(root)
    assert set(find_cycle(graph)) == {"sae_vision.a.x", "sae_vision.b.y"}
    assert set(find_cycle(package_graph(graph))) == {"sae_vision.a", "sae_vision.b"}
    bad = surface_violations(root)
    assert any("b/z.py:1 imports sae_vision.a.x" in b for b in bad), bad
    assert any("imports h from sae_vision.a" in b for b in bad), bad
    assert len(bad) == 2, bad
    # and the clean tree passes: drop the back edge and the bad imports
    (root / "sae_vision/b/y.py").write_text("def g():\n    return 1\n")
    (root / "sae_vision/b/z.py").write_text("from sae_vision.a import f\n")
    assert find_cycle(import_graph(root)) == [] and surface_violations(root) == []
