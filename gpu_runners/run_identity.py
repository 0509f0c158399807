"""Which workflow run a GPU runner belongs to, and every name derived from it.

The runner name doubles as its only routing label (`gpu-<run_id>-<attempt>`), the pod name and
the prefix of the Secret name, and the run id and attempt become label values that `delete`
and `reap` select on. Keeping the derivations here means a pod, its Secret and its GitHub
registration can always be found from the run alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gpu_runners import contract
from gpu_runners.errors import UsageError

DEFAULT_SERVER_URL = "https://github.com"

_REPOSITORY = re.compile(r"^[A-Za-z0-9-]+/[A-Za-z0-9._-]+$")
_RUNNER_NAME = re.compile(rf"^{re.escape(contract.GPU_RUNNER_PREFIX)}(\d+)-(\d+)$")


@dataclass(frozen=True)
class RunIdentity:
    """One attempt of one workflow run of one repository.

    Attributes:
        repository: `owner/name` of the repository whose workflow run asks for the runner.
        run_id: `GITHUB_RUN_ID`.
        attempt: `GITHUB_RUN_ATTEMPT` (1 for the first attempt, +1 per re-run).
        server_url: `GITHUB_SERVER_URL`, used to link the run from the pod's annotation.
    """

    repository: str
    run_id: int
    attempt: int
    server_url: str = DEFAULT_SERVER_URL

    def __post_init__(self) -> None:
        if not _REPOSITORY.match(self.repository):
            raise UsageError(
                f"--repository: {self.repository!r} is not an owner/name repository "
                f"(set it or {contract.ENV_REPOSITORY})"
            )
        if self.run_id < 1:
            raise UsageError(f"--run-id: {self.run_id} is not a positive workflow run id")
        if self.attempt < 1:
            raise UsageError(f"--run-attempt: {self.attempt} is not a positive attempt number")

    @property
    def runner_name(self) -> str:
        """Runner name and label, also the pod name: `gpu-<run_id>-<attempt>`."""
        return f"{contract.GPU_RUNNER_PREFIX}{self.run_id}-{self.attempt}"

    @property
    def pod_name(self) -> str:
        """Name of the GPU pod: the runner name, so `kubectl get pod <label>` finds it."""
        return self.runner_name

    @property
    def secret_name(self) -> str:
        """Name of the Secret holding this run's JIT runner config."""
        return f"{self.runner_name}{contract.JIT_SECRET_SUFFIX}"

    @property
    def run_url(self) -> str:
        """Web address of this attempt of the run, for the pod's annotation and the summary."""
        base = self.server_url.rstrip("/")
        return f"{base}/{self.repository}/actions/runs/{self.run_id}/attempts/{self.attempt}"

    @property
    def label_selector(self) -> str:
        """Selects this run attempt's objects, and only objects gpu_runners created."""
        return ",".join(f"{key}={value}" for key, value in self.selector_labels().items())

    def selector_labels(self) -> dict[str, str]:
        """The labels every object of this run attempt carries and `delete` selects on."""
        return {
            contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
            contract.LABEL_RUN_ID: str(self.run_id),
            contract.LABEL_RUN_ATTEMPT: str(self.attempt),
        }

    def owns(self, labels: Mapping[str, str] | None) -> bool:
        """Whether an object with these labels belongs to this run attempt.

        `delete` checks every listed object again with this, so a server that ignored the
        label selector still could not make it delete another run's pod.
        """
        actual = labels or {}
        return all(actual.get(key) == value for key, value in self.selector_labels().items())


def parse_runner_name(name: str) -> tuple[int, int] | None:
    """Returns (run id, attempt) from a `gpu-<run_id>-<attempt>` runner name, else None."""
    match = _RUNNER_NAME.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def _positive_int(text: str, option: str, env_name: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UsageError(
            f"{option}: {text!r} is not a positive integer (from {option} or {env_name})"
        )
    return int(text)


def resolve_run_identity(
    *,
    run_id: str | None,
    attempt: str | None,
    repository: str | None,
    environ: Mapping[str, str],
) -> RunIdentity:
    """Builds the RunIdentity from options, falling back to the GitHub Actions variables.

    Args:
        run_id: `--run-id`, or None for `GITHUB_RUN_ID`.
        attempt: `--run-attempt`, or None for `GITHUB_RUN_ATTEMPT` (default 1).
        repository: `--repository`, or None for `GITHUB_REPOSITORY`.
        environ: The process environment.

    Returns:
        The validated identity.

    Raises:
        UsageError: A value is missing (e.g. outside Actions) or malformed; names the option.
    """
    run_id_text = run_id or environ.get(contract.ENV_RUN_ID)
    if not run_id_text:
        raise UsageError(
            f"--run-id is required outside GitHub Actions ({contract.ENV_RUN_ID} is not set)"
        )
    attempt_text = attempt or environ.get(contract.ENV_RUN_ATTEMPT) or "1"
    repository_name = repository or environ.get(contract.ENV_REPOSITORY)
    if not repository_name:
        raise UsageError(
            f"--repository is required outside GitHub Actions ({contract.ENV_REPOSITORY} "
            "is not set)"
        )
    return RunIdentity(
        repository=repository_name,
        run_id=_positive_int(run_id_text, "--run-id", contract.ENV_RUN_ID),
        attempt=_positive_int(attempt_text, "--run-attempt", contract.ENV_RUN_ATTEMPT),
        server_url=environ.get(contract.ENV_SERVER_URL) or DEFAULT_SERVER_URL,
    )
