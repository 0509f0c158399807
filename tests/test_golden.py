"""Golden files: every Kubernetes object each stack declares, as reviewable YAML.

A change to what a stack applies shows up as a diff of tests/golden/<stack>/ in the pull
request. After an intended change, regenerate them:

    python -m scripts.render --stack dev --out tests/golden/dev
    python -m scripts.render --stack prod --out tests/golden/prod
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.render import render

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_rendered_objects_match_the_golden_files(stack: str, tmp_path: Path) -> None:
    rendered = {path.name: path.read_text() for path in render(stack, tmp_path)}
    golden = {path.name: path.read_text() for path in (GOLDEN / stack).glob("*.yaml")}
    assert sorted(rendered) == sorted(golden)
    for name, text in rendered.items():
        assert text == golden[name], (
            f"{stack}/{name} changed; if intended, regenerate: "
            f"python -m scripts.render --stack {stack} --out tests/golden/{stack}")
