"""The package's shape: no import cycle (lazy and ``TYPE_CHECKING`` imports included), a library that never prints and never
sets process-wide environment variables. Read from the source with ``ast``, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "loracompress"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere (top level, inside a function, or under
    ``TYPE_CHECKING``: an import for annotations only still makes the two modules a tangle to read)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from pkg import sub`` imports the submodule when there is one
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_even_through_lazy_imports():
    graph = import_graph()
    assert len(graph) > 40 and graph["loracompress.pipelines.prune"], "the graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_no_pipeline_special_cases_a_method_by_name():
    """The pipelines ask a method's class what it is (``trains``, ``nested``, ``keeps_best``), never its name."""
    offenders = [f"{p.name}:{n}" for p in sorted((PACKAGE / "pipelines").rglob("*.py"))
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if any(f'"{name}"' in line for name in ("dylora", "increlora", "prilora", "lorpa", "adalora"))
                 and "DEFAULT_CALIBRATION" not in line]
    assert not offenders, offenders


def test_the_library_never_prints_and_never_sets_environment_variables():
    offenders = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        main_lines: set[int] = set()
        for node in tree.body:  # a module's ``if __name__ == "__main__":`` block is a script, not the library
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                main_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in main_lines:
                continue
            text = ast.unparse(node) if isinstance(node, (ast.Call, ast.Assign, ast.Subscript)) else ""
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{name}:{node.lineno} print")
            elif isinstance(node, ast.Call) and text.startswith(("os.environ.setdefault", "os.environ.update", "os.putenv")):
                offenders.append(f"{name}:{node.lineno} {text[:40]}")
            elif isinstance(node, ast.Assign) and any(ast.unparse(t).startswith("os.environ[") for t in node.targets):
                offenders.append(f"{name}:{node.lineno} {text[:40]}")
    assert not offenders, offenders


def test_every_installed_package_is_the_folder_of_its_name():
    """Regression: ``loracompress_cli`` lived in ``cli/`` behind a setuptools ``package-dir`` rename, which
    only the editable finder honours; an editable install in compat mode (the project root on sys.path)
    then failed with "No module named 'loracompress_cli'". Folders named as their packages import in
    every install mode and from a plain checkout."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    root = PACKAGE.parent
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = config["tool"]["setuptools"]
    assert "package-dir" not in setuptools
    for package in setuptools["packages"]:
        assert (root / package.replace(".", "/") / "__init__.py").is_file(), package


def test_no_library_module_is_over_450_lines():
    """A module past a few hundred lines holds more than one job (the first architecture step split five of them)."""
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 450}
    assert not long, long


def test_merging_sits_below_the_pipelines_and_export_that_call_it():
    """Merging owns W + ΔW and its memory bounds; it reads adapters and bases (core, runtime) and is called by
    merge, export and the bank, never the other way round (a merging module importing export was how
    ``_untie`` ended up imported privately across packages)."""
    above = ("loracompress.pipelines", "loracompress.export", "loracompress.bank", "loracompress.calibration",
             "loracompress.gate")
    graph = import_graph()
    offenders = [f"{m} -> {t}" for m, targets in graph.items() if m.startswith("loracompress.merging")
                 for t in targets if t.startswith(above)]
    assert not offenders, offenders
    callers = {m for m, targets in graph.items() if any(t.startswith("loracompress.merging") for t in targets)}
    assert {"loracompress.pipelines.merge", "loracompress.export.onnx_merged", "loracompress.export.genai"} <= callers


def private_imports(roots: tuple[Path, ...] = (PACKAGE, PACKAGE.parent / "loracompress_cli")) -> list[str]:
    """``module:line name`` for each ``from loracompress... import _name`` (a dunder such as ``__version__``
    is public), read with ``ast`` from the library and the CLI."""
    found = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                        and node.module.split(".")[0] in ("loracompress", "loracompress_cli")):
                    continue
                found += [f"{path.relative_to(root.parent)}:{node.lineno} {a.name} from {node.module}" for a in node.names
                          if a.name.startswith("_") and not (a.name.startswith("__") and a.name.endswith("__"))]
    return found


def test_the_private_import_finder_finds_one(tmp_path: Path):
    (tmp_path / "loracompress").mkdir()
    (tmp_path / "loracompress" / "a.py").write_text(
        "from loracompress._version import __version__\nfrom loracompress.b import public\n"
        "def f():\n    from loracompress.b import _private\n")
    assert private_imports((tmp_path / "loracompress",)) == ["loracompress/a.py:4 _private from loracompress.b"]


def test_no_module_imports_another_modules_private_name():
    """What two modules share is public in the module that owns it (export/genai_bank.py imported five of
    export/genai.py's private helpers; they are now genai_verify's public functions)."""
    offenders = private_imports()
    assert not offenders, offenders
