"""The README tells the truth: its commands are the ones CI runs, its table is Pulumi.yaml's."""

from __future__ import annotations

import re

from tests.harness.mock_stack import REPO_ROOT, project_declarations

README = (REPO_ROOT / "README.md").read_text()


def table_rows() -> dict[str, list[str]]:
    rows = {}
    for line in README.splitlines():
        match = re.match(r"^\| `([A-Za-z]+)` \| (.*) \|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split(" | ")]
    return rows


def test_config_table_lists_every_key_with_its_declared_default() -> None:
    rows = table_rows()
    for key, declaration in project_declarations().items():
        assert key in rows, f"{key} missing from the README's configuration reference"
        type_cell, default_cell, description_cell = rows[key][:3]
        assert declaration["type"] in type_cell, key
        default = declaration.get("default")
        if default is None:
            assert "required" in default_cell, key
        elif isinstance(default, bool):
            assert default_cell == f"`{str(default).lower()}`", key
        elif isinstance(default, list):
            assert default_cell == ("`" + ", ".join(default) + "`" if default else "`[]`"), key
        elif default != "":
            assert default_cell == f"`{default}`", key
        assert description_cell == declaration["description"], key


def test_ci_runs_the_readme_test_command() -> None:
    assert "```sh\nbash scripts/check.sh\n```" in README
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "bash scripts/check.sh" in ci


def test_readme_main_command_names_an_existing_stack_script() -> None:
    assert "scripts/pulumi.sh up dev" in README
    assert (REPO_ROOT / "scripts" / "pulumi.sh").is_file()
    assert (REPO_ROOT / "Pulumi.dev.yaml").is_file()
