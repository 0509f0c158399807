"""The program runs with exactly what its main command installs.

`scripts/pulumi.sh` and `preview.yaml` install only requirements.txt into the virtualenv the
Pulumi language host runs `__main__.py` in. The test environment has far more (pytest, mypy,
the broker's server), so a module the program imports but requirements.txt does not provide
passes every other test and fails the first real `pulumi preview`. This follows the program's
imports from `__main__.py` through its own modules and checks every third-party module against
the distributions requirements.txt installs (with their dependencies).
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.harness.mock_stack import PROGRAM, PROJECT_FILE, REPO_ROOT

REQUIREMENTS = REPO_ROOT / "requirements.txt"
#: Top-level packages of this repository the program may import.
LOCAL_PACKAGES = {"components", "gpu_runners"}


def module_file(module: str) -> Path | None:
    """The file of a module of this repository, or None when it is not one."""
    base = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of the modules a file imports at run time (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    type_checking_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking_only |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_checking_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from package import submodule` imports the submodule too.
            found |= {f"{base}.{alias.name}" for alias in node.names
                      if module_file(f"{base}.{alias.name}") is not None}
    return found


def third_party_imports_of_the_program(entry: Path = PROGRAM) -> dict[str, str]:
    """Third-party top-level module -> the repository file that imports it first."""
    seen: set[Path] = set()
    pending = [entry]
    third_party: dict[str, str] = {}
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in sorted(imports_of(path)):
            top = name.split(".")[0]
            if top in LOCAL_PACKAGES:
                local = module_file(name)
                assert local is not None, f"{path.name} imports {name}, which does not exist"
                pending.append(local)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.setdefault(top, str(path.relative_to(REPO_ROOT)))
    return third_party


def requirement_names(path: Path) -> set[str]:
    names: set[str] = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip().rstrip("\\").strip()
        if line and not line.startswith("-"):
            names.add(canonicalize_name(Requirement(line).name))
    return names


def installed_closure(names: set[str]) -> set[str]:
    """The distributions pip installs for `names`: each with its dependencies, recursively."""
    closure: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # a lock entry for another platform (e.g. Windows only)
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(canonicalize_name(requirement.name))
    return closure


#: What runs from the program's virtualenv: the program itself, and the operator's `doctor`
#: (the README runs it with the same `.venv` after `scripts/pulumi.sh up`).
ENTRY_POINTS = [PROGRAM, REPO_ROOT / "gpu_runners" / "doctor" / "__main__.py"]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_every_module_the_program_imports_is_installed_by_requirements_txt(entry: Path) -> None:
    provided = installed_closure(requirement_names(REQUIREMENTS))
    distributions = metadata.packages_distributions()
    missing = {}
    for module, importer in third_party_imports_of_the_program(entry).items():
        owners = {canonicalize_name(d) for d in distributions.get(module, [])}
        if not owners & provided:
            missing[module] = f"imported by {importer}, provided by {sorted(owners) or '?'}"
    assert missing == {}


def test_the_import_walk_sees_the_programs_providers_and_its_runtime_modules() -> None:
    # Guards the walk itself: it reaches the components and the shared runtime modules.
    third_party = third_party_imports_of_the_program()
    assert {"pulumi", "pulumi_gcp", "pulumi_kubernetes", "pulumi_github",
            "pulumi_docker_build", "yaml"} <= set(third_party)
    assert "pytest" not in third_party


def test_the_language_host_runs_no_tool_requirements_txt_does_not_install() -> None:
    options = yaml.safe_load(PROJECT_FILE.read_text())["runtime"]["options"]
    provided = installed_closure(requirement_names(REQUIREMENTS))
    for tool_option in ("typechecker",):
        if tool_option in options:
            assert canonicalize_name(options[tool_option]) in provided, tool_option
    assert options["virtualenv"] == ".venv"
    assert re.search(r"--require-hashes -r requirements\.txt",
                     (REPO_ROOT / "scripts" / "pulumi.sh").read_text())
