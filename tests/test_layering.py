"""The package layering: a package imports only the packages below it (function-local imports count), so
there is no cycle between packages and a newcomer knows where a change belongs."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# package -> the project packages it may import (besides itself)
ALLOWED = {
    "common": set(),                                    # errors, files, dataspec: torch-free base
    "parse_args": {"common"},                           # the flag declaration
    "datasets": {"common"},                             # what training reads
    "gaze": {"common", "datasets"},                     # fixations -> heatmaps -> CRF -> gaze maps
    "prepare": {"common", "datasets", "gaze"},          # official downloads -> the prepared layout
    "models": {"common"},
    "losses": {"common", "models"},
    "engine": {"common", "parse_args", "datasets", "gaze", "models", "losses"},
    "release": {"common", "parse_args", "datasets", "models", "engine"},
    "experiments": {"common", "parse_args"},            # sweeps run children through run.py, never in-process
}
ENTRY_POINTS = {"run", "demo"}  # top-level commands: may import anything


def project_imports(path: Path) -> set[str]:
    """Top-level project package names imported anywhere in `path` (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & (set(ALLOWED) | ENTRY_POINTS)


def test_every_package_is_declared():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests", "scripts"}
    assert packages <= set(ALLOWED), f"a package missing from the layering table: {packages - set(ALLOWED)}"


def test_no_import_goes_up_a_layer():
    wrong = []
    for package, allowed in ALLOWED.items():
        module = REPO / f"{package}.py"
        files = [module] if module.is_file() else sorted(REPO.glob(f"{package}/**/*.py"))
        for path in files:
            for name in project_imports(path) - allowed - {package}:
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, "imports against the layering: " + "; ".join(wrong)


def test_the_table_has_no_cycle():
    seen, done = set(), set()

    def visit(package, trail):
        assert package not in seen - done, f"cycle: {' -> '.join(trail + [package])}"
        if package in done:
            return
        seen.add(package)
        for dep in ALLOWED[package]:
            visit(dep, trail + [package])
        done.add(package)

    for package in ALLOWED:
        visit(package, [])
