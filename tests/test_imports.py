"""The package's modules import one way: the methods never reach back into the study."""

import ast

from conftest import REPO


def imported_modules(path) -> set[str]:
    """The absolute names of every module `path` imports (relative imports resolved), at any depth."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


def test_no_method_module_imports_the_study_module():
    files = sorted((REPO / "workbench" / "methods").glob("*.py"))
    assert files
    for path in files:
        assert not {name for name in imported_modules(path) if name.startswith("workbench.spec")}, path.name


def test_the_study_module_imports_no_method_internals():
    reached = {name for name in imported_modules(REPO / "workbench" / "spec.py") if name.startswith("workbench.methods")}
    assert reached <= {"workbench.methods", "workbench.methods.METHODS", "workbench.methods.build_method"}
