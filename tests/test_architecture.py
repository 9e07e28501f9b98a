"""The dependency rules between the subpackages of smollm_stack, read from the source: every import statement of every
.py file, at module level or inside a function, and every importlib.import_module("...") with a literal name.

    kernels    know no model, trainer or tokenizer
    tokenizer  stands alone: no kernels, model or trainer
    model      knows no trainer or tokenizer
    bench      is imported by nobody (but the benchmarks themselves and the tests)

and none of them imports a subpackage by its bare name (`import kernels` finds Hugging Face's `kernels` package).
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOP = "smollm_stack"
PACKAGES = ("kernels", "model", "tokenizer", "train", "bench")
# package -> the packages it must not import, and the rule's wording for the failure message
FORBIDDEN = {
    "kernels": ({"model", "train", "tokenizer"}, "kernels know no model, trainer or tokenizer"),
    "tokenizer": ({"kernels", "model", "train"}, "the tokenizer stands alone"),
    "model": ({"train", "tokenizer"}, "the model knows no trainer or tokenizer"),
}
NO_BENCH = "nothing outside bench and tests imports bench"
BARE = f"our subpackages are imported as {TOP}.<name>"


def subpackage(name: str) -> str:
    """The subpackage a dotted import names: `smollm_stack.model.hf` -> `model`; a bare `model.hf` -> `bare model`."""
    parts = name.split(".")
    if parts[0] == TOP:
        return parts[1] if len(parts) > 1 else TOP
    return f"bare {parts[0]}" if parts[0] in PACKAGES else parts[0]


def imported_packages(source: str, package: str) -> list[tuple[int, str]]:
    """(line, subpackage) of every import in `source`, a module of `package` (relative imports stay in it)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, subpackage(alias.name)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, package))
        elif isinstance(node, ast.ImportFrom) and node.module == TOP:  # from smollm_stack import kernels, model
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, subpackage(node.module)))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, subpackage(node.args[0].value)))
    return sorted(found)


def violations(path: Path, package: str) -> list[str]:
    """'file:line: package imports X (rule)' for each import in `path` that breaks its package's rule."""
    forbidden, rule = FORBIDDEN.get(package, (set(), ""))
    name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    broken = []
    for line, imported in imported_packages(path.read_text(encoding="utf-8"), package):
        if imported in forbidden:
            broken.append(f"{name}:{line}: {package} imports {imported} (rule: {rule})")
        elif imported == "bench" and package not in ("bench", "tests"):
            broken.append(f"{name}:{line}: {package} imports bench (rule: {NO_BENCH})")
        elif imported.startswith("bare "):
            broken.append(f"{name}:{line}: {package} imports {imported} (rule: {BARE})")
    return broken


def test_packages_keep_the_dependency_rules():
    files = {package: sorted((REPO / TOP / package).rglob("*.py")) for package in PACKAGES}
    files[TOP] = sorted((REPO / TOP).glob("*.py"))  # the command dispatcher: bound by the bench rule
    files["tests"] = sorted((REPO / "tests").glob("*.py"))  # bound by the full-name rule alone
    assert all(files.values()), f"a package has no .py files: {[p for p, f in files.items() if not f]}"
    broken = [v for package, paths in files.items() for path in paths for v in violations(path, package)]
    assert not broken, "dependency rules broken:\n" + "\n".join(broken)


def test_the_check_sees_every_kind_of_import(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "import os\n"
        "import smollm_stack.model.config\n"
        "from . import eager\n"
        "def f():\n"
        "    from smollm_stack.tokenizer.hashing import EMPTY\n"
        "    importlib.import_module('smollm_stack.train.loop')\n"
        "    return __import__('smollm_stack.bench.env')\n"
        "from smollm_stack import reference, train\n"
        "import kernels\n"
        "from model.config import ModelConfig\n"
    )
    rule = FORBIDDEN["kernels"][1]
    assert violations(source, "kernels") == [
        f"{source}:2: kernels imports model (rule: {rule})",
        f"{source}:5: kernels imports tokenizer (rule: {rule})",
        f"{source}:6: kernels imports train (rule: {rule})",
        f"{source}:7: kernels imports bench (rule: {NO_BENCH})",
        f"{source}:8: kernels imports train (rule: {rule})",
        f"{source}:9: kernels imports bare kernels (rule: {BARE})",
        f"{source}:10: kernels imports bare model (rule: {BARE})",
    ]
    assert violations(source, "bench") == [  # the benchmarks may import anything of ours, by its full name
        f"{source}:9: bench imports bare kernels (rule: {BARE})",
        f"{source}:10: bench imports bare model (rule: {BARE})",
    ]


# The trainer's rooms: what each lower room may import from the rest of train/ (besides itself). The top floor
# (the run loop, the command lines, experiments, the CS336 adapters, the package face) may import any room, and
# no room imports it.
ROOMS = {
    "precision": set(),
    "loggers": set(),
    "metrics": set(),
    "schedule": set(),  # pure learning-rate math: resuming's file moves live in store/resume.py
    "data": set(),
    "parallel": set(),
    "config": {"precision", "loggers"},  # the lowest floor of the trainer's own: argument parsing lives in cli
    "optim": {"config"},
    "store": {"config", "schedule", "optim", "parallel"},
    "log": {"store", "loggers"},
    "eval": {"data", "lm"},
    "lm": {"store"},
}
TOP_FLOOR = {"loop", "cli", "__main__", "__init__", "experiments", "cs336"}
TRAIN = REPO / TOP / "train"


def train_module(path: Path) -> str:
    """smollm_stack/train/store/resume.py -> store.resume; a package's __init__.py -> the package."""
    parts = path.relative_to(TRAIN).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def room(module: str) -> str:
    return module.split(".")[0]


def train_imports(path: Path) -> set[str]:
    """The train modules that `path` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.startswith(f"{TOP}.train."):
                module = name.removeprefix(f"{TOP}.train.")
                parts = module.split(".")
                while parts and not (
                    (TRAIN / "/".join(parts)).with_suffix(".py").is_file()
                    or (TRAIN / "/".join(parts) / "__init__.py").is_file()
                ):
                    parts.pop()
                if parts:
                    found.add(".".join(parts))
    return found - {train_module(path)}


def train_graph() -> dict[str, set[str]]:
    return {train_module(p): train_imports(p) for p in sorted(TRAIN.rglob("*.py"))}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph` (Tarjan's strongly connected components of more than one module)."""
    index, low, stack, found, counter = {}, {}, [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def room_violations(graph: dict[str, set[str]]) -> list[str]:
    broken = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            source_room, target_room = room(module), room(target)
            if source_room == target_room or source_room in TOP_FLOOR:
                continue
            if target_room in TOP_FLOOR:
                broken.append(f"{module} imports {target}: nothing below the top floor imports it")
            elif target_room not in ROOMS.get(source_room, set()):
                broken.append(f"{module} imports {target}: {source_room} may import only {sorted(ROOMS[source_room])}")
    return broken


def test_the_trainer_keeps_its_rooms():
    graph = train_graph()
    unknown = {room(m) for m in graph} - set(ROOMS) - TOP_FLOOR
    assert not unknown, f"rooms with no rule in ROOMS or TOP_FLOOR: {sorted(unknown)}"
    assert not circles(graph), f"import circles in train/: {circles(graph)}"
    broken = room_violations(graph)
    assert not broken, "room rules broken:\n" + "\n".join(broken)


def test_the_room_check_sees_circles_and_upward_arrows():
    graph = {"config": {"loop"}, "loop": {"config"}, "data.tokens": {"optim.muon"}, "optim.muon": set()}
    assert circles(graph) == [["config", "loop"]]
    assert room_violations(graph) == [
        "config imports loop: nothing below the top floor imports it",
        "data.tokens imports optim.muon: data may import only []",
    ]
    assert (
        train_module(TRAIN / "store" / "resume.py") == "store.resume"
        and train_module(TRAIN / "data" / "__init__.py") == "data"
    )
