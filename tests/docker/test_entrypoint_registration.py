"""docker/entrypoint.sh in registration mode (the base runner), run for real against FakeGitHub.

Each test starts the entrypoint with bash in a runner folder whose config.sh and run.sh are
recording stand-ins, and checks what reached GitHub and what the runner scripts were given.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from gpu_runners import contract
from tests.docker.conftest import POD_NAME, StartEntrypoint
from tests.docker.runner_folder import RunnerFolder
from tests.fakes.github_api import FakeGitHub, RecordedRequest

REGISTRATION_TOKEN = r"/actions/runners/registration-token$"
REMOVE_TOKEN = r"/actions/runners/remove-token$"
RUNNER_URL = "https://github.com/acme/models"


def endpoints(github: FakeGitHub) -> list[str]:
    """`METHOD last-path-segment` of every request GitHub received, in order."""
    return [f"{r.method} {r.path.rsplit('/', 1)[-1]}" for r in github.requests]


def secrets_of(github: FakeGitHub) -> list[str]:
    """The PAT and every token the fake issued."""
    return [github.token, *github.registration_tokens, *github.remove_tokens]


# --- Registering ------------------------------------------------------------------------------


def test_registration_token_is_requested_with_the_pat_as_bearer_token(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(0)

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 0, result.stderr
    (request,) = fake_github.requests_to(REGISTRATION_TOKEN)
    assert request.method == "POST"
    assert request.path == "/repos/acme/models/actions/runners/registration-token"
    assert request.headers["authorization"] == f"Bearer {fake_github.token}"
    assert request.headers["accept"] == "application/vnd.github+json"
    assert request.headers["x-github-api-version"] == "2022-11-28"


def test_config_sh_registers_the_pod_under_its_hostname_with_the_labels_and_no_self_update(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(0)

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 0, result.stderr
    (config,) = runner_folder.starts("config.sh")
    assert config["argv"] == [
        "--unattended", "--url", RUNNER_URL, "--token", fake_github.registration_tokens[0],
        "--name", POD_NAME, "--work", "_work", "--disableupdate",
        "--labels", contract.BASE_RUNNER_LABEL,
    ]
    (run,) = runner_folder.starts("run.sh")
    assert run["argv"] == []


@pytest.mark.parametrize(("value", "ephemeral"), [("true", True), ("1", True), ("false", False)])
def test_runner_ephemeral_adds_the_ephemeral_flag(
    value: str, ephemeral: bool, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(0)
    registration_env[contract.ENV_RUNNER_EPHEMERAL] = value

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 0, result.stderr
    (config,) = runner_folder.starts("config.sh")
    assert ("--ephemeral" in config["argv"]) is ephemeral


def test_an_invalid_runner_ephemeral_is_refused_naming_the_variable(
    fake_github: FakeGitHub, registration_env: dict[str, str], start_entrypoint: StartEntrypoint,
) -> None:
    registration_env[contract.ENV_RUNNER_EPHEMERAL] = "sometimes"

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 2
    assert result.error_lines() == [
        "entrypoint: error: RUNNER_EPHEMERAL is 'sometimes'; allowed: true, false (or 1, 0)"
    ]
    assert fake_github.requests == []


def test_organisation_scope_registers_with_the_organisation(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(0)
    with FakeGitHub(org="acme-labs", token=fake_github.token) as org_github:
        # GITHUB_ORG wins over the GITHUB_REPOSITORY the image bakes in.
        env = {**registration_env, contract.ENV_ORGANIZATION: "acme-labs",
               contract.ENV_API_URL: org_github.url}

        result = start_entrypoint(env).finish()

        assert result.returncode == 0, result.stderr
        assert [r.path for r in org_github.requests] == [
            "/orgs/acme-labs/actions/runners",
            "/orgs/acme-labs/actions/runners/registration-token",
        ]
        (config,) = runner_folder.starts("config.sh")
        assert config["argv"][:5] == [
            "--unattended", "--url", "https://github.com/acme-labs",
            "--token", org_github.registration_tokens[0],
        ]


def test_the_runners_exit_status_becomes_the_entrypoints(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(7)

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 7
    # It stopped by itself (an ephemeral runner after its job): nothing to remove.
    assert fake_github.requests_to(REMOVE_TOKEN) == []


def test_a_failing_config_sh_ends_the_entrypoint_with_its_status_before_the_runner_starts(
    registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.config_fails_with(5)

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 5
    assert result.error_lines() == ["entrypoint: error: config.sh failed with status 5"]
    assert runner_folder.starts("run.sh") == []


def test_a_configuration_left_by_a_previous_start_is_discarded_before_registering(
    registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(0)
    # What a restarted container (same file system) finds; config.sh refuses to run over it.
    (runner_folder.path / ".runner").write_text('{"agentName": "old"}')
    (runner_folder.path / ".credentials").write_text("{}")

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 0, result.stderr
    assert not (runner_folder.path / ".credentials").exists()
    (config,) = runner_folder.starts("config.sh")
    assert config["argv"][0] == "--unattended"


# --- Replacing an earlier registration --------------------------------------------------------


def test_an_offline_registration_under_the_pods_name_is_replaced(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(0)
    # Left by this pod's previous container, which crashed without deregistering.
    fake_github.add_runner(POD_NAME, [contract.BASE_RUNNER_LABEL], status="offline")

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 0, result.stderr
    (lookup,) = fake_github.requests_to(r"/actions/runners$", "GET")
    assert lookup.query["name"] == [POD_NAME]
    (config,) = runner_folder.starts("config.sh")
    assert "--replace" in config["argv"]


def test_no_replace_without_an_earlier_registration(
    registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(0)

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 0, result.stderr
    (config,) = runner_folder.starts("config.sh")
    assert "--replace" not in config["argv"]


def test_an_online_runner_with_the_pods_name_is_never_replaced(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    fake_github.add_runner(POD_NAME, [contract.BASE_RUNNER_LABEL], status="online", busy=True)

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 3
    (error,) = result.error_lines()
    assert f"a runner named {POD_NAME} is online in repository acme/models" in error
    assert "refusing to replace it" in error
    assert fake_github.requests_to(REGISTRATION_TOKEN) == []
    assert runner_folder.starts("config.sh") == []


# --- Signals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"]
)
def test_a_signal_stops_the_runner_removes_it_with_a_fresh_token_and_exits_128_plus_signal(
    signum: signal.Signals, code: int, fake_github: FakeGitHub,
    registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    process = start_entrypoint(registration_env)
    process.wait_until_runner_listens()

    process.send(signum)
    result = process.finish()

    assert result.returncode == code, result.stderr
    assert endpoints(fake_github) == ["GET runners", "POST registration-token", "POST remove-token"]
    (remove_request,) = fake_github.requests_to(REMOVE_TOKEN)
    assert remove_request.method == "POST"
    assert remove_request.headers["authorization"] == f"Bearer {fake_github.token}"
    # The runner was asked to stop (run.sh passes TERM on to the listener) before removal.
    events = [(e["script"], e["event"], e.get("argv", [""])[:1]) for e in runner_folder.calls()]
    assert events == [
        ("config.sh", "start", ["--unattended"]),
        ("run.sh", "start", []),
        ("run.sh", "listening", [""]),
        ("run.sh", "signal", [""]),
        ("config.sh", "start", ["remove"]),
    ]
    assert runner_folder.calls("run.sh", "signal")[0]["signal"] == "SIGTERM"
    remove = runner_folder.starts("config.sh")[1]
    assert remove["argv"] == ["remove", "--unattended", "--token", fake_github.remove_tokens[0]]
    assert not (runner_folder.path / ".runner").exists()


def test_the_runner_runs_in_its_own_process_group_with_sigint_enabled(
    registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    # A plain background job of a script ignores SIGINT, and so would the runner's listener,
    # which stops on the INT that run.sh sends it.
    runner_folder.run_exits_with(0)

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 0, result.stderr
    (run,) = runner_folder.starts("run.sh")
    assert run["sigint_ignored"] is False
    assert run["own_process_group"] is True


def test_a_signal_while_waiting_to_retry_exits_at_once_with_nothing_to_remove(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    registration_env[contract.ENV_API_MAX_WAIT_SECONDS] = "120"
    fake_github.inject("POST", REGISTRATION_TOKEN, 503, headers={"Retry-After": "60"})
    process = start_entrypoint(registration_env)
    process.wait_until_logged("trying again in 60s")

    process.send(signal.SIGTERM)
    result = process.finish(timeout=10)

    assert result.returncode == 143
    assert result.seconds < 10  # not the 60 s GitHub asked for
    assert runner_folder.starts("config.sh") == []
    assert fake_github.requests_to(REMOVE_TOKEN) == []


def test_a_failed_removal_is_reported_and_still_exits_143(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    fake_github.inject("POST", REMOVE_TOKEN, 500, times=50)
    process = start_entrypoint(registration_env)
    process.wait_until_runner_listens()

    process.send(signal.SIGTERM)
    result = process.finish()

    assert result.returncode == 143
    assert f"warning: the runner stays registered as {POD_NAME}" in result.stderr
    assert [c["argv"][0] for c in runner_folder.starts("config.sh")] == ["--unattended"]


# --- Refusals: one clear line, no config.sh -------------------------------------------------


def test_a_bad_or_expired_pat_401_exits_naming_the_token_source(
    fake_github: FakeGitHub, registration_env: dict[str, str], pat_file: Path,
    runner_folder: RunnerFolder, start_entrypoint: StartEntrypoint,
) -> None:
    pat_file.chmod(0o600)
    pat_file.write_text("ghp_revoked\n")

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 3
    assert result.error_lines() == [
        f"entrypoint: error: GitHub rejected the PAT from the file {pat_file} (GITHUB_PAT_FILE) "
        "(401 Bad credentials): it is wrong, expired or revoked"
    ]
    assert runner_folder.starts("config.sh") == []
    assert "ghp_revoked" not in result.output


def test_a_pat_without_the_scope_403_exits_naming_the_scope_and_permission(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    fake_github.inject("POST", REGISTRATION_TOKEN, 403,
                       body={"message": "Resource not accessible by personal access token"})

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 3
    (error,) = result.error_lines()
    assert "may not manage the runners of repository acme/models" in error
    assert "(403 Resource not accessible by personal access token)" in error
    assert "a classic PAT needs the repo scope" in error
    assert "'Administration: read and write'" in error
    assert runner_folder.starts("config.sh") == []


def test_an_unknown_repository_404_exits_naming_the_setting_to_check(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    registration_env[contract.ENV_REPOSITORY] = "acme/modles"

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 3
    (error,) = result.error_lines()
    assert "GitHub knows no repository acme/modles, or the PAT's owner is not an admin" in error
    assert error.endswith("check GITHUB_REPOSITORY")
    assert runner_folder.starts("config.sh") == []


def test_another_client_error_is_reported_on_one_line_with_githubs_message(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    fake_github.inject("POST", REGISTRATION_TOKEN, 422,
                       body={"message": "Invalid request.\n\nRunner registration is disabled."})

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 3
    assert result.error_lines() == [
        "entrypoint: error: GitHub answered 422 to POST /repos/acme/models/actions/runners/"
        "registration-token: Invalid request. Runner registration is disabled."
    ]
    assert len(fake_github.requests_to(REGISTRATION_TOKEN)) == 1  # not retried
    assert runner_folder.starts("config.sh") == []


def test_a_missing_repository_is_a_clear_error_before_any_request(
    fake_github: FakeGitHub, registration_env: dict[str, str], start_entrypoint: StartEntrypoint,
) -> None:
    del registration_env[contract.ENV_REPOSITORY]

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 2
    assert result.error_lines() == [
        "entrypoint: error: no runner scope: set GITHUB_REPOSITORY to owner/name "
        "(or GITHUB_ORG to an organisation)"
    ]
    assert fake_github.requests == []


def test_a_repository_that_is_not_owner_slash_name_is_refused(
    fake_github: FakeGitHub, registration_env: dict[str, str], start_entrypoint: StartEntrypoint,
) -> None:
    registration_env[contract.ENV_REPOSITORY] = "https://github.com/acme/models"

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 2
    assert result.error_lines() == [
        "entrypoint: error: GITHUB_REPOSITORY is 'https://github.com/acme/models'; "
        "it must be owner/name"
    ]
    assert fake_github.requests == []


# --- Retries ----------------------------------------------------------------------------------


def test_two_500s_then_201_registers(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(0)
    fake_github.inject("POST", REGISTRATION_TOKEN, 500, times=2)

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 0, result.stderr
    assert len(fake_github.requests_to(REGISTRATION_TOKEN, "POST")) == 3
    (config,) = runner_folder.starts("config.sh")
    assert config["argv"][4] == fake_github.registration_tokens[0]


def test_429_with_retry_after_waits_that_long_before_trying_again(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(0)
    arrivals: list[float] = []

    def note_arrival(request: RecordedRequest) -> None:
        if request.path.endswith("/registration-token"):
            arrivals.append(time.monotonic())

    fake_github.on_request(note_arrival)
    fake_github.inject("POST", REGISTRATION_TOKEN, 429, headers={"Retry-After": "1"})

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 0, result.stderr
    assert len(arrivals) == 2
    # The backoff base is 10 ms here, so only Retry-After explains a one-second gap.
    assert 0.95 <= arrivals[1] - arrivals[0] < 3.0


def test_a_rate_limited_403_is_waited_out_not_taken_for_a_missing_scope(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(0)
    fake_github.inject("POST", REGISTRATION_TOKEN, 403, headers={
        "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(time.time()))})

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 0, result.stderr
    assert len(fake_github.requests_to(REGISTRATION_TOKEN, "POST")) == 2
    assert "rate limited (403)" in result.stderr


def test_a_retry_after_beyond_the_wait_budget_fails_at_once(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    registration_env[contract.ENV_API_MAX_WAIT_SECONDS] = "5"
    fake_github.inject("POST", REGISTRATION_TOKEN, 429, headers={"Retry-After": "3600"})

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 4
    (error,) = result.error_lines()
    assert "rate limited (429)" in error
    assert "waiting 3600s more would exceed the retry budget of 5s" in error
    assert "RUNNER_API_MAX_WAIT_SECONDS" in error
    assert result.seconds < 5
    assert runner_folder.starts("config.sh") == []


def test_a_dropped_connection_is_retried(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(0)
    fake_github.inject("POST", REGISTRATION_TOKEN, None, drop=True)

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 0, result.stderr
    assert len(fake_github.requests_to(REGISTRATION_TOKEN, "POST")) == 2
    assert "no answer (curl exit status 52)" in result.stderr


def test_an_outage_gives_up_after_a_bounded_number_of_tries(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    fake_github.inject("POST", REGISTRATION_TOKEN, 503, times=100)

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 4
    assert result.error_lines() == [
        "entrypoint: error: gave up on POST /repos/acme/models/actions/runners/"
        "registration-token after 8 tries: GitHub answered 503"
    ]
    assert len(fake_github.requests_to(REGISTRATION_TOKEN, "POST")) == 8
    assert runner_folder.starts("config.sh") == []


# --- Where the PAT comes from, and where it never goes -----------------------------------------


def test_the_pat_file_is_preferred_over_the_seed_env_variable(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(0)
    registration_env[contract.ENV_PAT_SEED] = "ghp_stale_copy_in_env"

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 0, result.stderr
    assert {r.headers["authorization"] for r in fake_github.requests} == {
        f"Bearer {fake_github.token}"
    }


def test_the_seed_env_pat_is_accepted_and_kept_from_the_runner_and_its_jobs(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(0)
    del registration_env[contract.ENV_PAT_FILE]
    registration_env[contract.ENV_PAT_SEED] = fake_github.token

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 0, result.stderr
    assert len(fake_github.requests_to(REGISTRATION_TOKEN)) == 1
    (config,) = runner_folder.starts("config.sh")
    (run,) = runner_folder.starts("run.sh")
    for started in (config, run):
        assert contract.ENV_PAT_SEED not in started["env"]
        assert fake_github.token not in started["env"].values()


def test_an_unreadable_pat_file_is_a_clear_error_before_any_request(
    fake_github: FakeGitHub, registration_env: dict[str, str], tmp_path: Path,
    start_entrypoint: StartEntrypoint,
) -> None:
    missing = tmp_path / "not-mounted" / "token"
    registration_env[contract.ENV_PAT_FILE] = str(missing)
    # A PAT in env does not hide a PAT file that was named but is not there.
    registration_env[contract.ENV_PAT_SEED] = fake_github.token

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 2
    assert result.error_lines() == [
        f"entrypoint: error: GITHUB_PAT_FILE names {missing}, which cannot be read"
    ]
    assert fake_github.requests == []


def test_no_pat_anywhere_is_a_clear_error_naming_each_source(
    fake_github: FakeGitHub, registration_env: dict[str, str], start_entrypoint: StartEntrypoint,
) -> None:
    del registration_env[contract.ENV_PAT_FILE]

    result = start_entrypoint(registration_env).finish()

    assert result.returncode == 2
    assert result.error_lines() == [
        "entrypoint: error: no GitHub PAT: set GITHUB_PAT_FILE to a file holding one, mount one "
        f"at {contract.PAT_MOUNT_DIR}/{contract.PAT_SECRET_KEY}, or set GITHUB_RUNNER_PAT"
    ]
    assert fake_github.requests == []


def test_neither_the_pat_nor_a_token_is_ever_printed(
    fake_github: FakeGitHub, registration_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    fake_github.inject("POST", REGISTRATION_TOKEN, 500)  # a retry logs its request too
    process = start_entrypoint(registration_env)
    process.wait_until_runner_listens()
    process.send(signal.SIGTERM)
    result = process.finish()

    assert result.returncode == 143, result.stderr
    assert len(secrets_of(fake_github)) == 3
    for secret in secrets_of(fake_github):
        assert secret not in result.output
    (run,) = runner_folder.starts("run.sh")
    assert not any(fake_github.token in value for value in run["env"].values())
