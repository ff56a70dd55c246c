"""The package's shape: imports run only downward through the layers, the commands stay thin, no SystemExit in
library code. Read from the source (AST), so lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PKG = REPO / "minihiggs"
# Lower layers never import higher ones; a package may import itself and anything below.
LAYERS = [
    {"errors", "constants"},
    {"layouts"},
    {"hub", "fsio", "wrappers", "config", "cli"},
    {"text", "audio"},
    {"codec"},
    {"data"},
    {"model"},
    {"lora"},
    {"metrics"},
    {"prep", "generate"},
    {"eval"},
    {"train", "ingest"},
    {"export", "tiny", "serve", "__init__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def unit_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def imported_units(path: Path) -> set[str]:
    """Top-level minihiggs units (sub-package or module) that `path` imports, absolute or relative."""
    tree = ast.parse(path.read_text())
    pkg_parts = list(path.relative_to(REPO).with_suffix("").parts[:-1])  # the importing module's package
    if path.name == "__init__.py":
        pkg_parts = list(path.relative_to(REPO).parent.parts)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[:len(pkg_parts) - (node.level - 1)]
                full = base + (node.module.split(".") if node.module else [])
                names = [full + [a.name] for a in node.names] if not node.module else [full]
            else:
                names = [node.module.split(".")] if node.module else []
            for parts in names:
                if parts and parts[0] == "minihiggs" and len(parts) > 1:
                    out.add(parts[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "minihiggs" and len(parts) > 1:
                    out.add(parts[1])
    return out


def test_every_unit_has_a_layer():
    units = {unit_of(p) for p in PKG.rglob("*.py")}
    assert units <= set(LEVEL), f"add to LAYERS: {sorted(units - set(LEVEL))}"


def test_imports_only_run_downward():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = unit_of(path)
        for other in imported_units(path):
            if other != me and LEVEL.get(other, -1) >= LEVEL[me] and me != "__init__":
                bad.append(f"{path.relative_to(REPO)} ({me}, layer {LEVEL[me]}) imports {other} "
                           f"(layer {LEVEL.get(other)})")
    assert not bad, "\n".join(bad)


def test_the_layer_check_sees_relative_and_lazy_imports(tmp_path):
    """The checker itself: a relative import inside a function is found (so the test above can fail)."""
    units = imported_units(PKG / "train" / "distributed.py")
    assert "lora" in units and "errors" in units


def test_library_code_never_raises_system_exit():
    hits = [f"{p.relative_to(REPO)}:{n.lineno}" for p in PKG.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.Raise) and n.exc is not None and "SystemExit" in ast.unparse(n.exc)]
    assert not hits, hits


def test_commands_are_thin():
    """prep.py / train.py parse flags and call one package function; the work lives in minihiggs/."""
    for name in ("prep.py", "train.py"):
        tree = ast.parse((REPO / name).read_text())
        funcs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
        assert not classes and set(funcs) <= {"main", "parse_args"}, (name, funcs, classes)
        assert len((REPO / name).read_text().splitlines()) < 120, name
