"""The loader modules import in one direction: base_loader <- each loader <- loader (the
factory). A circle would make the import order matter and hide errors behind ImportError."""
import ast
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "fastavts" / "data"
LOADERS = ["dali_loader", "pyav_loader", "memory_loader", "decord_loader"]


def _imports(module: str) -> set[str]:
    tree = ast.parse((DATA / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):          # function-level (lazy) imports count too
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_base_loader_imports_no_loader_and_no_loader_imports_the_factory():
    assert not _imports("base_loader") & {*LOADERS, "loader"}
    for m in LOADERS:
        assert "loader" not in _imports(m), m
    assert set(LOADERS) <= _imports("loader")
