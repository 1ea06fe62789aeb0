"""Imports point down only (see the house style): policy is pure, the simulator runs policy alone.

Every import in the source is read with `ast`, including ones inside functions, so a lazy import
cannot slip past."""
import ast
import sys

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "pdserve"
POLICY_MAY_IMPORT = ("pdserve.policy", "pdserve.clock")
POLICY_THIRD_PARTY = {"numpy"}
SIM_MAY_IMPORT = ("pdserve.policy", "pdserve.clock", "pdserve.traces", "pdserve.sim")


def imported_modules(source: str, rel_path: str) -> set[str]:
    """Every module a file at `rel_path` (relative to the repo) imports."""
    names = set()
    for node in ast.walk(ast.parse(source, filename=rel_path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolve against the module's own package
                base = ".".join(rel_path.removesuffix(".py").split("/")[:-node.level])
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(node.module)
    return names


def imports_of(path) -> set[str]:
    return imported_modules(path.read_text(), path.relative_to(REPO_ROOT).as_posix())


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _policy_violations(name: str) -> bool:
    top = name.split(".")[0]
    if top == "pdserve":
        return not _within(name, POLICY_MAY_IMPORT)
    return top not in sys.stdlib_module_names and top not in POLICY_THIRD_PARTY and top != "__future__"


@pytest.mark.parametrize("path", sorted((PACKAGE / "policy").glob("*.py")), ids=lambda p: p.name)
def test_policy_imports_only_stdlib_numpy_and_itself(path):
    bad = sorted(n for n in imports_of(path) if _policy_violations(n))
    assert not bad, f"{path.name} imports {bad}: policy code must stay pure"


@pytest.mark.parametrize("path", sorted((PACKAGE / "sim").glob("*.py")), ids=lambda p: p.name)
def test_simulator_imports_no_adapter(path):
    bad = sorted(n for n in imports_of(path) if n.startswith("pdserve") and not _within(n, SIM_MAY_IMPORT))
    assert not bad, f"{path.name} imports {bad}: the simulator runs policy objects only"


def test_the_checker_catches_a_forbidden_import():
    source = "import grpc\nimport numpy as np\nfrom pdserve.router import service\nfrom . import dispatch\n"
    names = imported_modules(source, "pdserve/policy/probe.py")
    assert [n for n in sorted(names) if _policy_violations(n)] == ["grpc", "pdserve.router"]
    assert "pdserve.policy" in names                   # the relative import, resolved
