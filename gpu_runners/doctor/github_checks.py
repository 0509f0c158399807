"""Checks of the GitHub side: the repository ids the broker trusts, the token's rights, the
base runner's registration. Pure functions over what `clients.DoctorGitHub` fetched."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gpu_runners import contract
from gpu_runners.doctor.report import CheckResult, Status
from gpu_runners.github_api import Runner

#: Classic PAT scope the runner endpoints need on a repository.
REQUIRED_SCOPE = "repo"


def check_repository_ids(repository: str, answer: Mapping[str, Any],
                         broker_env: Mapping[str, str]) -> CheckResult:
    """The repository's numeric ids equal those the broker compares OIDC tokens with."""
    check = "repository ids"
    actual_id = str(answer.get("id", ""))
    owner = answer.get("owner") or {}
    actual_owner = str(owner.get("id", "")) if isinstance(owner, dict) else ""
    expected_id = broker_env.get(contract.ENV_REPOSITORY_ID)
    expected_owner = broker_env.get(contract.ENV_REPOSITORY_OWNER_ID)
    fix = (f"run pulumi up so the broker gets {repository}'s current ids (a deleted and "
           "re-created repository has new ones), or pass the --repository the stack serves")
    if expected_id is None or expected_owner is None:
        return CheckResult(
            check, Status.FAIL,
            f"the broker's Deployment sets no {contract.ENV_REPOSITORY_ID}/"
            f"{contract.ENV_REPOSITORY_OWNER_ID}",
            fix=fix,
        )
    wrong = []
    if actual_id != expected_id:
        wrong.append(f"repository id is {actual_id}, the broker expects {expected_id}")
    if actual_owner != expected_owner:
        wrong.append(f"owner id is {actual_owner}, the broker expects {expected_owner}")
    if wrong:
        return CheckResult(check, Status.FAIL, f"{repository}: " + "; ".join(wrong), fix=fix)
    return CheckResult(check, Status.PASS,
                       f"{repository}: id {actual_id}, owner id {actual_owner}, as the broker "
                       "expects")


def check_token_scopes(scopes_header: str | None, source: str) -> CheckResult:
    """A classic PAT (it lists its scopes in X-OAuth-Scopes) holds `repo`."""
    check = "token: scopes"
    if scopes_header is None:
        return CheckResult(check, Status.PASS,
                           f"token from {source} is fine-grained (no classic scopes); its "
                           "permissions are checked by the runner list")
    scopes = [scope.strip() for scope in scopes_header.split(",") if scope.strip()]
    if REQUIRED_SCOPE in scopes:
        return CheckResult(check, Status.PASS,
                           f"classic PAT from {source} with scopes: {', '.join(scopes)}")
    return CheckResult(
        check, Status.FAIL,
        f"classic PAT from {source} has scopes {', '.join(scopes) or 'none'}, without "
        f"{REQUIRED_SCOPE}",
        fix=f"create the PAT with the {REQUIRED_SCOPE} scope (and workflow if the stack "
            "commits the example workflow), update the stack's secret and run pulumi up",
    )


def check_runner_access(error: str | None, runner_count: int) -> CheckResult:
    """The token may list the repository's runners (fine-grained: Administration read)."""
    check = "token: runner administration"
    if error is None:
        return CheckResult(check, Status.PASS,
                           f"the token lists the repository's runners ({runner_count})")
    return CheckResult(
        check, Status.FAIL, error,
        fix="give the token the repo scope (classic) or the repository permission "
            "Administration: read and write (fine-grained), then update the stack's secret",
    )


def check_base_runner_online(runners: Sequence[Runner], namespace: str) -> CheckResult:
    """At least one runner labelled base-runner is registered and online."""
    check = "base runner: online on GitHub"
    base = [runner for runner in runners if contract.BASE_RUNNER_LABEL in runner.labels]
    online = [runner for runner in base if runner.online]
    if online:
        return CheckResult(check, Status.PASS,
                           f"{len(online)} runner(s) labelled {contract.BASE_RUNNER_LABEL} online "
                           f"({', '.join(runner.name for runner in online)})")
    seen = (f"{len(base)} registered, none online" if base
            else f"no runner labelled {contract.BASE_RUNNER_LABEL} is registered")
    return CheckResult(
        check, Status.FAIL, seen,
        fix=f"kubectl -n {namespace} logs deployment/{contract.BASE_RUNNER_APP} says why it "
            "did not register (a wrong or expired runner PAT, no network to GitHub)",
    )


def check_actions_write(scopes_header: str | None, source: str,
                        broker_env: Mapping[str, str], max_preemption_retries: int) -> CheckResult:
    """With Spot preemption recovery on, the broker's credential may write Actions runs.

    The broker re-runs a run's failed jobs after its Spot node was reclaimed, and cancels a
    run it gives up on (`POST /repos/{owner}/{repo}/actions/runs/{id}/rerun-failed-jobs` and
    `/cancel`): GitHub's Actions: write permission, which a classic PAT holds with `repo`.
    """
    check = "token: actions write"
    if max_preemption_retries == 0:
        return CheckResult(check, Status.SKIP,
                           "preemption recovery is off (maxPreemptionRetries 0): the broker "
                           "re-runs and cancels no run")
    why = ("to re-run a run after its Spot node was reclaimed (rerun-failed-jobs, cancel)")
    app_id = broker_env.get(contract.ENV_GITHUB_APP_ID)
    if app_id:
        return CheckResult(check, Status.SKIP,
                           f"the broker authenticates as GitHub App {app_id}, whose permissions "
                           "this token cannot read: the App needs Repository permissions -> "
                           f"Actions: Read and write {why}")
    if scopes_header is None:
        return CheckResult(check, Status.SKIP,
                           f"token from {source} is fine-grained (GitHub does not list its "
                           "permissions): the broker's credential needs Actions: Read and "
                           f"write on the repository {why}")
    scopes = [scope.strip() for scope in scopes_header.split(",") if scope.strip()]
    if REQUIRED_SCOPE in scopes:
        return CheckResult(check, Status.PASS,
                           f"classic PAT from {source}: its {REQUIRED_SCOPE} scope includes "
                           f"Actions write, {why}")
    return CheckResult(
        check, Status.FAIL,
        f"classic PAT from {source} has scopes {', '.join(scopes) or 'none'}, without "
        f"{REQUIRED_SCOPE}: the broker cannot re-run a run after its Spot node was reclaimed",
        fix=f"create the PAT with the {REQUIRED_SCOPE} scope (or set maxPreemptionRetries 0 to "
            "turn recovery off), update the stack's secret and run pulumi up",
    )
