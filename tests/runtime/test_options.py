"""Checks of what users type and what the environment provides, before any API call."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from gpu_runners import contract
from gpu_runners.environment import default_max_runtime_seconds, resolve_namespace
from gpu_runners.errors import UsageError
from gpu_runners.github_api import load_token, scope_from
from gpu_runners.gpu_pools import (
    GpuPool,
    check_gpu_request,
    fallback_pool,
    format_gpu_pools,
    parse_gpu_pools,
    parse_gpu_types,
)
from gpu_runners.label_syntax import label_key_problem, label_value_problem
from gpu_runners.pod_options import RunnerPodOptions
from gpu_runners.quantities import parse_duration_seconds, parse_quantity
from gpu_runners.run_identity import (
    RunIdentity,
    RunKey,
    parse_runner_name,
    resolve_run_identity,
    run_key_from_labels,
)
from tests.harness.kubernetes_labels import (
    INVALID_KEYS,
    INVALID_VALUES,
    VALID_KEYS,
    VALID_VALUES,
)

POOLS = (GpuPool("nvidia-l4", 1), GpuPool("nvidia-tesla-t4", 4))
ACTIONS_ENV = {
    contract.ENV_RUN_ID: "987654321",
    contract.ENV_RUN_ATTEMPT: "2",
    contract.ENV_REPOSITORY: "acme/models",
    contract.ENV_SERVER_URL: "https://github.example.com",
}


# --- the run --------------------------------------------------------------------------------


def test_run_identity_comes_from_the_actions_variables() -> None:
    identity = resolve_run_identity(run_id=None, attempt=None, repository=None,
                                    environ=ACTIONS_ENV)

    assert identity == RunIdentity("acme/models", 987654321, 2, "https://github.example.com")
    assert identity.runner_name == "gpu-987654321-2"
    assert identity.secret_name == "gpu-987654321-2-jit"
    assert identity.run_url == (
        "https://github.example.com/acme/models/actions/runs/987654321/attempts/2"
    )


def test_options_win_over_the_actions_variables() -> None:
    identity = resolve_run_identity(run_id="5", attempt="1", repository="acme/other",
                                    environ=ACTIONS_ENV)

    assert (identity.repository, identity.run_id, identity.attempt) == ("acme/other", 5, 1)


def test_missing_run_id_outside_actions_names_the_option() -> None:
    with pytest.raises(UsageError, match=r"--run-id is required outside GitHub Actions"):
        resolve_run_identity(run_id=None, attempt=None, repository="acme/models", environ={})


@pytest.mark.parametrize(
    ("run_id", "attempt", "repository", "message"),
    [
        ("12a", "1", "acme/models", "--run-id"),
        ("0", "1", "acme/models", "--run-id"),
        ("12", "-1", "acme/models", "--run-attempt"),
        ("12", "1", "acme", "--repository"),
    ],
)
def test_malformed_run_values_are_refused_naming_the_option(
    run_id: str, attempt: str, repository: str, message: str
) -> None:
    with pytest.raises(UsageError, match=f"^{message}"):
        resolve_run_identity(run_id=run_id, attempt=attempt, repository=repository, environ={})


def test_selector_matches_only_objects_of_the_same_run_and_attempt() -> None:
    identity = RunIdentity("acme/models", 7, 1)
    same = identity.selector_labels()

    assert identity.label_selector == (
        "app.kubernetes.io/managed-by=gpu-runners,gpu-runners/run-id=7,gpu-runners/run-attempt=1"
    )
    assert identity.owns({**same, "extra": "x"})
    assert not identity.owns({**same, contract.LABEL_RUN_ATTEMPT: "2"})
    assert not identity.owns({**same, contract.LABEL_RUN_ID: "77"})
    assert not identity.owns({k: v for k, v in same.items() if k != contract.LABEL_MANAGED_BY})


def test_a_run_with_a_repository_id_labels_and_selects_its_objects_by_it_too() -> None:
    identity = RunIdentity("acme/models", 7, 1, repository_id=74)

    assert identity.selector_labels() == {
        contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
        contract.LABEL_RUN_ID: "7",
        contract.LABEL_RUN_ATTEMPT: "1",
        contract.LABEL_REPOSITORY_ID: "74",
    }
    assert identity.label_selector.endswith(",gpu-runners/repository-id=74")
    same = identity.selector_labels()
    assert identity.owns(same)
    # A re-created repository of the same name has another id: its run 7 is not this one.
    assert not identity.owns({**same, contract.LABEL_REPOSITORY_ID: "75"})
    assert not identity.owns({k: v for k, v in same.items() if k != contract.LABEL_REPOSITORY_ID})


def test_the_run_key_is_repository_id_run_id_and_attempt_and_reads_back_from_labels() -> None:
    identity = RunIdentity("acme/models", 7, 2, repository_id=74)

    assert identity.run_key == RunKey(74, 7, 2)
    assert run_key_from_labels(identity.selector_labels()) == RunKey(74, 7, 2)
    assert RunIdentity("acme/models", 7, 2).run_key == RunKey(None, 7, 2)
    assert run_key_from_labels(RunIdentity("acme/models", 7, 2).selector_labels()) == RunKey(
        None, 7, 2
    )


@pytest.mark.parametrize(
    "labels",
    [
        None,
        {contract.LABEL_RUN_ID: "7", contract.LABEL_RUN_ATTEMPT: "1"},  # not managed by us
        {contract.LABEL_MANAGED_BY: contract.MANAGED_BY, contract.LABEL_RUN_ID: "7"},
        {contract.LABEL_MANAGED_BY: contract.MANAGED_BY, contract.LABEL_RUN_ID: "0",
         contract.LABEL_RUN_ATTEMPT: "1"},
        {contract.LABEL_MANAGED_BY: contract.MANAGED_BY, contract.LABEL_RUN_ID: "7",
         contract.LABEL_RUN_ATTEMPT: "1", contract.LABEL_REPOSITORY_ID: "x"},
        {contract.LABEL_MANAGED_BY: contract.MANAGED_BY, contract.LABEL_RUN_ID: "\u0667",
         contract.LABEL_RUN_ATTEMPT: "1"},
    ],
)
def test_objects_without_a_whole_run_key_in_their_labels_have_none(
    labels: dict[str, str] | None,
) -> None:
    assert run_key_from_labels(labels) is None


def test_a_repository_id_below_one_is_refused() -> None:
    with pytest.raises(UsageError, match=r"^repository_id: 0 is not a positive"):
        RunIdentity("acme/models", 7, 1, repository_id=0)


@pytest.mark.parametrize(
    ("name", "parsed"),
    [("gpu-123-1", (123, 1)), ("gpu-runner", None), ("gpu-12-x", None), ("base-runner", None)],
)
def test_runner_names_parse_back_to_their_run(name: str, parsed: tuple[int, int] | None) -> None:
    assert parse_runner_name(name) == parsed


# --- GPUs -----------------------------------------------------------------------------------


def test_gpu_pools_parse_from_the_base_runner_environment() -> None:
    text = '[{"accelerator": "nvidia-l4", "maxGpusPerPod": 1}, ' \
           '{"accelerator": "nvidia-tesla-t4", "maxGpusPerPod": 4}]'

    assert parse_gpu_pools(text) == POOLS
    assert parse_gpu_pools(None) == ()


@pytest.mark.parametrize(
    "text",
    ["not json", '{"accelerator": "nvidia-l4"}', '[{"accelerator": "nvidia-l4"}]',
     '[{"accelerator": "NVIDIA L4", "maxGpusPerPod": 1}]',
     '[{"accelerator": "nvidia-l4", "maxGpusPerPod": 0}]'],
)
def test_malformed_gpu_pools_are_refused_naming_the_variable(text: str) -> None:
    with pytest.raises(UsageError, match=contract.ENV_GPU_POOLS):
        parse_gpu_pools(text)


def test_gpu_types_form_an_ordered_fallback_list_without_repeats() -> None:
    assert parse_gpu_types(["nvidia-l4,nvidia-tesla-t4", "nvidia-l4", "nvidia-a100-80gb"]) == (
        "nvidia-l4", "nvidia-tesla-t4", "nvidia-a100-80gb",
    )


@pytest.mark.parametrize(
    ("count", "types", "message"),
    [
        (0, (), r"^--gpus: 0 is not allowed"),
        (2, ("nvidia-l4",), r"^--gpus: 2 is more than a nvidia-l4 node has \(1\)"),
        (8, (), r"^--gpus: 8 is more than any GPU pool has"),
        (1, ("nvidia-h100-80gb",), r"^--gpu-type: 'nvidia-h100-80gb' is not a GPU pool"),
        (2, ("nvidia-tesla-t4", "nvidia-l4"), r"^--gpus: 2 is more than a nvidia-l4"),
    ],
)
def test_gpu_requests_no_pool_can_serve_are_refused(
    count: int, types: tuple[str, ...], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        check_gpu_request(count, types, POOLS)


def test_gpu_requests_within_a_pool_are_accepted() -> None:
    check_gpu_request(4, ("nvidia-tesla-t4",), POOLS)
    check_gpu_request(3, (), POOLS)
    check_gpu_request(16, ("anything-goes",), ())  # pools unknown: only the count is checked


def test_gpu_type_names_must_be_accelerator_names() -> None:
    with pytest.raises(UsageError, match=r"^--gpu-type: 'Nvidia L4'"):
        parse_gpu_types(["Nvidia L4"])


# --- sizes and durations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("16Gi", Decimal(16 * 2**30)), ("500m", Decimal("0.5")), ("1.5", Decimal("1.5")),
     ("2e3", Decimal(2000)), ("4G", Decimal(4 * 10**9))],
)
def test_kubernetes_quantities_parse_to_their_value(text: str, value: Decimal) -> None:
    assert parse_quantity(text, "--memory") == value


@pytest.mark.parametrize("text", ["16GB", "16 Gi", "-1", "0", "Gi", "1.2.3"])
def test_malformed_quantities_are_refused_naming_the_option(text: str) -> None:
    with pytest.raises(UsageError, match=r"^--memory: "):
        parse_quantity(text, "--memory")


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("20m", 1200), ("6h", 21600),
                                               ("15", 900)])
def test_durations_parse_with_minutes_as_the_bare_unit(text: str, seconds: int) -> None:
    assert parse_duration_seconds(text, "--timeout") == seconds


@pytest.mark.parametrize("text", ["0", "1d", "-5m", "ten"])
def test_malformed_durations_are_refused_naming_the_option(text: str) -> None:
    with pytest.raises(UsageError, match=r"^--timeout: "):
        parse_duration_seconds(text, "--timeout")


# --- environment defaults ---------------------------------------------------------------------


def test_namespace_comes_from_option_then_environment_then_own_pod_then_default(
    tmp_path: Path,
) -> None:
    own = tmp_path / "namespace"
    env = {contract.ENV_NAMESPACE: "runners"}

    assert resolve_namespace("ml", env, own_namespace_file=own) == "ml"
    assert resolve_namespace(None, env, own_namespace_file=own) == "runners"
    assert resolve_namespace(None, {}, own_namespace_file=own) == contract.DEFAULT_NAMESPACE
    own.write_text("ci-gpu\n")
    assert resolve_namespace(None, {}, own_namespace_file=own) == "ci-gpu"


def test_max_runtime_default_comes_from_the_environment_in_minutes() -> None:
    assert default_max_runtime_seconds({contract.ENV_MAX_RUNTIME_MINUTES: "90"}) == 5400
    assert default_max_runtime_seconds({}) == 6 * 3600
    with pytest.raises(UsageError, match=contract.ENV_MAX_RUNTIME_MINUTES):
        default_max_runtime_seconds({contract.ENV_MAX_RUNTIME_MINUTES: "1.5"})


def test_runner_scope_is_the_organisation_when_one_is_given() -> None:
    assert scope_from(repository="acme/models", organization=None, environ={}).path == (
        "/repos/acme/models"
    )
    assert scope_from(repository=None, organization=None,
                      environ={contract.ENV_ORGANIZATION: "acme"}).path == "/orgs/acme"
    with pytest.raises(UsageError, match="--repository"):
        scope_from(repository=None, organization=None, environ={})


# --- the token --------------------------------------------------------------------------------


def test_token_file_wins_over_token_variables(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("ghp_from_file\n")
    environ = {contract.ENV_PAT_FILE: str(token_file), contract.ENV_PAT_SEED: "ghp_seed",
               contract.ENV_GITHUB_TOKEN: "ghp_env"}

    token = load_token(environ)

    assert token.value == "ghp_from_file"
    assert str(token_file) in token.source
    assert "ghp_from_file" not in repr(token)


def test_seed_pat_variable_wins_over_github_token() -> None:
    environ = {contract.ENV_PAT_SEED: "ghp_seed", contract.ENV_GITHUB_TOKEN: "ghp_env"}

    assert load_token(environ).value == "ghp_seed"
    assert load_token({contract.ENV_GITHUB_TOKEN: "ghp_env"}).value == "ghp_env"


def test_unreadable_token_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(UsageError, match=f"{contract.ENV_PAT_FILE} names {missing}"):
        load_token({contract.ENV_PAT_FILE: str(missing), contract.ENV_PAT_SEED: "ghp_seed"})


def test_no_token_anywhere_names_every_place_looked() -> None:
    with pytest.raises(UsageError) as error:
        load_token({})

    for name in (contract.ENV_PAT_FILE, contract.ENV_PAT_SEED, contract.ENV_GITHUB_TOKEN):
        assert name in str(error.value)


# --- labels: Kubernetes' own rules ---------------------------------------------------------


@pytest.mark.parametrize("key", VALID_KEYS)
def test_label_keys_the_api_server_accepts_are_accepted(key: str) -> None:
    assert label_key_problem(key) is None


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_label_keys_the_api_server_refuses_are_refused(key: str) -> None:
    assert label_key_problem(key) is not None


@pytest.mark.parametrize("value", VALID_VALUES)
def test_label_values_the_api_server_accepts_are_accepted(value: str) -> None:
    assert label_value_problem(value) is None


@pytest.mark.parametrize("value", INVALID_VALUES)
def test_label_values_the_api_server_refuses_are_refused(value: str) -> None:
    assert label_value_problem(value) is not None


def test_a_label_prefix_with_an_empty_part_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(UsageError) as refused:
        RunnerPodOptions(namespace="github-runners", image="ghcr.io/acme/runner:1",
                         extra_labels={"example..com/team": "ml"})

    assert str(refused.value) == (
        "--label: the prefix 'example..com' of 'example..com/team' is not a DNS subdomain: at "
        "most 253 characters, dot-separated parts of lowercase letters, digits and '-', each "
        "starting and ending with a letter or digit (Kubernetes' label syntax)"
    )


@pytest.mark.parametrize("key", [contract.LABEL_REPOSITORY_ID, contract.LABEL_RUN_ID])
def test_labels_gpu_runners_sets_cannot_be_overridden(key: str) -> None:
    with pytest.raises(UsageError, match=f"^--label: '{key}' is set by gpu_runners"):
        RunnerPodOptions(namespace="github-runners", image="ghcr.io/acme/runner:1",
                         extra_labels={key: "1"})


# --- GPU pools with names, Spot and on-demand fallbacks ------------------------------------------

SPOT_L4 = GpuPool("nvidia-l4", 1, name="l4-spot", spot=True, on_demand_fallback="l4")
ON_DEMAND_L4 = GpuPool("nvidia-l4", 2, name="l4")
NAMED_POOLS = (SPOT_L4, ON_DEMAND_L4, GpuPool("nvidia-tesla-t4", 1, name="t4-spot", spot=True))


def test_named_pools_round_trip_with_their_spot_status_and_fallback() -> None:
    text = format_gpu_pools(NAMED_POOLS)

    assert json.loads(text)[0] == {"accelerator": "nvidia-l4", "maxGpusPerPod": 1,
                                   "name": "l4-spot", "spot": True, "onDemandFallback": "l4"}
    assert json.loads(text)[1] == {"accelerator": "nvidia-l4", "maxGpusPerPod": 2, "name": "l4"}
    assert parse_gpu_pools(text) == NAMED_POOLS


def test_the_two_key_form_still_parses_as_nameless_on_demand_pools() -> None:
    (pool,) = parse_gpu_pools('[{"accelerator": "nvidia-l4", "maxGpusPerPod": 1}]')

    assert pool == GpuPool("nvidia-l4", 1)
    assert (pool.name, pool.spot, pool.on_demand_fallback) == ("", False, None)
    assert format_gpu_pools([pool]) == '[{"accelerator": "nvidia-l4", "maxGpusPerPod": 1}]'


def test_the_fallback_of_a_spot_pool_is_its_on_demand_pool() -> None:
    assert fallback_pool(NAMED_POOLS, "l4-spot") == ON_DEMAND_L4
    assert fallback_pool(NAMED_POOLS, "t4-spot") is None  # no fallback: retry in its pool
    assert fallback_pool(NAMED_POOLS, "l4") is None
    assert fallback_pool(NAMED_POOLS, "gone") is None
    assert fallback_pool(NAMED_POOLS, "") is None
    assert fallback_pool(parse_gpu_pools('[{"accelerator": "nvidia-l4", "maxGpusPerPod": 1}]'),
                         "") is None


def _entry(**fields: object) -> dict[str, object]:
    return {"accelerator": "nvidia-l4", "maxGpusPerPod": 1, "name": "l4-spot", "spot": True,
            **fields}


ON_DEMAND_ENTRY = {"accelerator": "nvidia-l4", "maxGpusPerPod": 1, "name": "l4"}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([_entry(spot="yes")], r"entry 0 .*\"spot\" must be true or false"),
        ([_entry(name="L4 Spot")], r"entry 0 .*\"name\" must be a node pool name"),
        ([_entry(onDemandFallback=3)], r"entry 0 .*\"onDemandFallback\" must be the name"),
        ([_entry(zones=["us-central1-a"])], r"entry 0 .*unknown key\(s\) zones"),
        ([_entry(name="", onDemandFallback="l4"), ON_DEMAND_ENTRY], r"entry 0 .*needs its"),
        ([_entry(onDemandFallback="l4", spot=False), ON_DEMAND_ENTRY],
         r"entry 0 \(l4-spot\): onDemandFallback 'l4' is set on an on-demand pool"),
        ([_entry(onDemandFallback="l4-spot")], r"entry 0 \(l4-spot\): .* names the pool itself"),
        ([_entry(onDemandFallback="l4")], r"entry 0 \(l4-spot\): .* names no pool"),
        ([_entry(onDemandFallback="l4"), {**ON_DEMAND_ENTRY, "spot": True}],
         r"entry 0 \(l4-spot\): .* names a Spot pool"),
        ([_entry(onDemandFallback="l4"), {**ON_DEMAND_ENTRY, "accelerator": "nvidia-tesla-t4"}],
         r"entry 0 \(l4-spot\): .* has nvidia-tesla-t4, not nvidia-l4"),
        ([_entry(onDemandFallback="l4", maxGpusPerPod=2), ON_DEMAND_ENTRY],
         r"entry 0 \(l4-spot\): .* fewer than this pool's 2"),
        ([_entry(), _entry()], r"several entries are named l4-spot"),
    ],
)
def test_bad_pool_names_spot_or_fallbacks_are_refused_naming_the_entry(
    entries: list[object], message: str
) -> None:
    with pytest.raises(UsageError, match=contract.ENV_GPU_POOLS + ".*" + message):
        parse_gpu_pools(json.dumps(entries))


def test_a_request_fits_a_type_if_it_fits_any_pool_of_that_type() -> None:
    # The Spot L4 pool has 1 GPU a node, its on-demand fallback 2.
    check_gpu_request(2, ("nvidia-l4",), NAMED_POOLS)
    with pytest.raises(UsageError, match=r"^--gpus: 3 is more than a nvidia-l4 node has \(2\); "
                                         r"pools: nvidia-l4 \(up to 2\), nvidia-tesla-t4 \(up to "
                                         r"1\)$"):
        check_gpu_request(3, ("nvidia-l4",), NAMED_POOLS)
