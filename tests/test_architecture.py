"""The dependency rules between the packages, read from the source: every import statement of every .py file, at
module level or inside a function, and every importlib.import_module("...") with a literal name.

    kernels    know no model, trainer or tokenizer
    tokenizer  stands alone: no kernels, model or trainer
    model      knows no trainer or tokenizer
    bench      is imported by nobody (but the benchmarks themselves and the tests)
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "model", "tokenizer", "train", "bench")
# package -> the packages it must not import, and the rule's wording for the failure message
FORBIDDEN = {
    "kernels": ({"model", "train", "tokenizer"}, "kernels know no model, trainer or tokenizer"),
    "tokenizer": ({"kernels", "model", "train"}, "the tokenizer stands alone"),
    "model": ({"train", "tokenizer"}, "the model knows no trainer or tokenizer"),
}
NO_BENCH = "nothing outside bench and tests imports bench"


def imported_packages(source: str, package: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in `source`, a module of `package` (relative imports stay in it)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, package if node.level else node.module.split(".")[0]))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value.split(".")[0]))
    return sorted(found)


def violations(path: Path, package: str) -> list[str]:
    """'file:line: package imports X (rule)' for each import in `path` that breaks its package's rule."""
    forbidden, rule = FORBIDDEN.get(package, (set(), ""))
    name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    broken = []
    for line, imported in imported_packages(path.read_text(encoding="utf-8"), package):
        if imported in forbidden:
            broken.append(f"{name}:{line}: {package} imports {imported} (rule: {rule})")
        elif imported == "bench" and package != "bench":
            broken.append(f"{name}:{line}: {package} imports bench (rule: {NO_BENCH})")
    return broken


def test_packages_keep_the_dependency_rules():
    files = {package: sorted((REPO / package).rglob("*.py")) for package in PACKAGES}
    assert all(files.values()), f"a package has no .py files: {[p for p, f in files.items() if not f]}"
    broken = [v for package, paths in files.items() for path in paths for v in violations(path, package)]
    assert not broken, "dependency rules broken:\n" + "\n".join(broken)


def test_the_check_sees_every_kind_of_import(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "import os\n"
        "import model.config\n"
        "from . import eager\n"
        "def f():\n"
        "    from tokenizer.hashing import EMPTY\n"
        "    importlib.import_module('train.loop')\n"
        "    return __import__('bench.env')\n"
    )
    rule = FORBIDDEN["kernels"][1]
    assert violations(source, "kernels") == [
        f"{source}:2: kernels imports model (rule: {rule})",
        f"{source}:5: kernels imports tokenizer (rule: {rule})",
        f"{source}:6: kernels imports train (rule: {rule})",
        f"{source}:7: kernels imports bench (rule: {NO_BENCH})",
    ]
    assert violations(source, "bench") == []  # the benchmarks may import anything
