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


# --------------------------------------------------------------------------------------------
# the package as a whole: one home per concept

ROOT = DATA.parents[1]
KINDS = ("contrastive", "ce", "infonce")


def _modules() -> dict[str, Path]:
    """fastavts.* module name -> file (kernels/ is installed as fastavts.kernels)."""
    out = {}
    for base, pkg in ((ROOT / "fastavts", "fastavts"), (ROOT / "kernels", "fastavts.kernels")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (function-level imports
    too); `from X import name` counts X.name where that is a module, else X."""
    mods = _modules()
    graph = {}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [(mod, a.name) for a in node.names]
            else:
                continue
            for mod, attr in targets:
                if attr and f"{mod}.{attr}" in mods:
                    deps.add(f"{mod}.{attr}")
                elif mod in mods:
                    deps.add(mod)
        graph[name] = deps - {name}
    return graph


def test_no_import_cycle_between_the_package_modules():
    graph = _graph()
    assert "fastavts.objectives" in graph and "fastavts.train.loop" in graph
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_function_is_longer_than_120_lines():
    long = []
    for f in _modules().values():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 120:
                    long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def _is_loss_kind(node) -> bool:
    """`<anything>.loss.kind`, a name `loss_kind`, or a loss kind's name as a string."""
    if isinstance(node, ast.Attribute) and node.attr == "kind":
        v = node.value
        return isinstance(v, ast.Attribute) and v.attr == "loss"
    if isinstance(node, ast.Name):
        return node.id == "loss_kind"
    return isinstance(node, ast.Constant) and node.value in KINDS


def test_only_the_config_and_the_objectives_branch_on_the_loss_kind():
    """What a loss kind means lives in fastavts/objectives.py (config.py validates the kind's
    name): nowhere else compares the loss kind, or a kind's name, with anything."""
    allowed = {ROOT / "fastavts" / "config.py", ROOT / "fastavts" / "objectives.py"}
    found = []
    for f in _modules().values():
        if f in allowed:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            operands = []
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
            elif isinstance(node, ast.Dict):
                operands = [k for k in node.keys if k is not None]
            elif isinstance(node, ast.match_case):
                operands = list(ast.walk(node.pattern))
            if any(_is_loss_kind(x) for x in operands):
                found.append(f"{f.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)[:80]}")
    assert not found, found
