"""The core's package structure: imports point from the method's stages down to the shared layers, never back up and
never round in a cycle; the trainer and the evaluation never import each other and nothing else imports them."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "invadapter_core"
# a package may import packages of a lower rank (and itself); face and reference are siblings
RANK = {"arch": 0, "files": 1, "comfyui": 2, "face": 3, "reference": 3, "adapter": 4, "train": 5, "evaluate": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every invadapter_core module ``path`` imports, at module level or inside a function."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{module}.{alias.name}"
                is_module = (ROOT / (sub.replace(".", "/") + ".py")).exists() or (ROOT / sub.replace(".", "/")).is_dir()
                found.add(sub if is_module else module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("invadapter_core")}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in CORE.rglob("*.py")}


def package_of(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def test_every_core_module_is_in_a_stage_package():
    loose = [p.name for p in CORE.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside the stage packages: {loose}"
    assert {p.name for p in CORE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(RANK)


def test_imports_point_down_the_stages():
    upward = []
    for module, deps in graph().items():
        mine = package_of(module)
        for dep in deps:
            theirs = package_of(dep)
            if mine and theirs and mine != theirs and RANK[theirs] >= RANK[mine]:
                upward.append(f"{module} -> {dep}")
    assert not upward, upward


def test_no_import_cycle():
    full = graph()
    g = {m: {d for d in deps if d in full} for m, deps in full.items()}
    state, cycle = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g[m]):
            if d == m:
                continue
            if state.get(d) == "open":
                cycle.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycle, cycle


def test_nothing_outside_the_tools_imports_train_or_evaluate():
    users = []
    for path in list(CORE.rglob("*.py")) + list((ROOT / "nodes").glob("*.py")):
        mine = package_of(module_name(path)) if path.is_relative_to(CORE) else None
        for dep in imports_of(path):
            theirs = package_of(dep)
            if theirs in ("train", "evaluate") and mine != theirs:
                users.append(f"{path.relative_to(ROOT)} -> {dep}")
    assert not users, users
