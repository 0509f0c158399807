"""Render every Kubernetes object a stack declares as YAML files, without a cloud or the CLI.

Runs the Pulumi program for the stack under mocks (tests/harness/mock_stack.py), with test
values for the placeholders and secrets, and writes one file per object; secret values are
redacted. Reviewers and scanners read what would be applied.

    python -m scripts.render --stack dev --out build/rendered/dev
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from tests.harness.mock_stack import run_program


def render(stack: str, out: Path) -> list[Path]:
    """Write the stack's Kubernetes objects to `out`, one YAML file each; return the files."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.yaml"):
        stale.unlink()
    written: list[Path] = []
    for resource in run_program(stack).kubernetes_objects():
        manifest = resource.manifest(redact_secrets=True)
        # Namespaced objects of one kind may share a name (a pull Secret in each namespace).
        where = [manifest["metadata"]["namespace"]] if "namespace" in manifest["metadata"] else []
        path = out / ("-".join([manifest["kind"].lower(), *where,
                                manifest["metadata"]["name"]]) + ".yaml")
        if path in written:
            raise ValueError(f"two objects would be written to {path}")
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", default="dev", help="stack whose Pulumi.<stack>.yaml to read")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory to write (default: build/rendered/<stack>)")
    args = parser.parse_args()
    out = args.out or Path("build") / "rendered" / args.stack
    for path in render(args.stack, out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
