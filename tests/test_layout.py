"""The house: the import graph of `ekx` has no cycle, stage 2 never imports stage 1's
pipeline, and the CLI starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ekx

ROOT = Path(ekx.__file__).parent
STAGE2 = ("ekx.heads", "ekx.api")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every ekx module this one imports at run time (module level or inside functions;
    `if TYPE_CHECKING:` blocks excluded: they never run)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_type_checking(node)
        for child in node.body
        for n in ast.walk(child)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ekx")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("ekx"):
                continue
            for a in node.names:  # `from ekx.heads import models` names a module
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(path, name, set(mods)) for name, path in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_graph_sees_known_edges():
    """Guard the walker itself: a broken parser would make the two tests below pass vacuously."""
    g = _graph()
    assert "ekx.heads.checkpoint" in g["ekx.heads.train"]
    assert "ekx.runtime" in g["ekx.heads.train"]
    assert "ekx.extract.pipeline" in g["ekx.finetune.run"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_import_graph_has_no_cycle():
    assert _cycle(_graph()) is None


def test_stage2_never_imports_the_stage1_pipeline():
    g = _graph()
    bad = [
        (m, n)
        for m, deps in g.items()
        if m.startswith(STAGE2)
        for n in deps
        if n.startswith(("ekx.extract.pipeline", "ekx.extract.video", "ekx.extract.inputs", "ekx.extract.writer"))
    ]
    assert not bad, bad


def test_head_registry_package_holds_only_heads():
    from ekx.heads import models

    modules = {p.stem for p in (ROOT / "heads" / "models").glob("*.py")} - {"__init__"}
    assert modules == {"layers", *(n.replace("-", "_") for n in models.REGISTRY)}


def test_cli_imports_no_torch():
    heavy = ("torch", "torchvision", "decord", "h5py", "optuna")
    code = f"import sys, ekx.cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_stage2_imports_no_torchvision():
    """torchvision's import (it loads torch._dynamo) is ~2 s of every process that trains,
    sweeps or evaluates heads; stage 2 needs none of it (a cache's extractor spec is plain values)."""
    code = (
        "import sys; sys.modules['torchvision'] = None\n"  # any import of it fails
        "import ekx.heads.train, ekx.heads.sweep, ekx.heads.search, ekx.heads.evaluate, ekx.heads.pool"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


# modules allowed past the limit for now, each with its reason and its ceiling (none today:
# heads/search.py was split into search.py, journal.py and pool.py)
OVER: dict[str, int] = {}


def test_no_module_far_over_400_lines():
    lines = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    long = {name: n for name, n in lines.items() if n > OVER.get(name, 420)}
    assert not long, long
