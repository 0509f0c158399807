"""Which workflow run a GPU runner belongs to, and every name derived from it.

The runner name doubles as its only routing label (`gpu-<run_id>-<attempt>`), the pod name and
the prefix of the Secret name, and the run id and attempt (and, for runs the broker serves, the
repository id) become label values that `delete` and `reap` select on. Keeping the derivations
here means a pod, its Secret and its GitHub registration can always be found from the run alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from gpu_runners import contract
from gpu_runners.errors import UsageError

DEFAULT_SERVER_URL = "https://github.com"

_REPOSITORY = re.compile(r"^[A-Za-z0-9-]+/[A-Za-z0-9._-]+$")
_RUNNER_NAME = re.compile(rf"^{re.escape(contract.GPU_RUNNER_PREFIX)}(\d+)-(\d+)$")


class RunKey(NamedTuple):
    """What makes spawn and delete idempotent: one attempt of one run of one repository.

    Attributes:
        repository_id: GitHub's numeric repository id (names can be recycled, ids cannot);
            None for a run whose identity did not come from a verified token.
        run_id: The workflow run id.
        attempt: The run attempt.
    """

    repository_id: int | None
    run_id: int
    attempt: int


@dataclass(frozen=True)
class RunIdentity:
    """One attempt of one workflow run of one repository.

    Attributes:
        repository: `owner/name` of the repository whose workflow run asks for the runner.
        run_id: `GITHUB_RUN_ID`.
        attempt: `GITHUB_RUN_ATTEMPT` (1 for the first attempt, +1 per re-run).
        server_url: `GITHUB_SERVER_URL`, used to link the run from the pod's annotation.
        repository_id: GitHub's numeric id of `repository`, from the verified OIDC token's
            `repository_id` claim. When set, every object of the run carries it as a label and
            `delete` selects on it too, so a run of a re-created repository of the same name
            can never touch this one's objects.
    """

    repository: str
    run_id: int
    attempt: int
    server_url: str = DEFAULT_SERVER_URL
    repository_id: int | None = None

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
        if self.repository_id is not None and self.repository_id < 1:
            raise UsageError(
                f"repository_id: {self.repository_id} is not a positive GitHub repository id"
            )

    @property
    def run_key(self) -> RunKey:
        """(repository id, run id, attempt): the key spawn and delete are idempotent on."""
        return RunKey(self.repository_id, self.run_id, self.attempt)

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
        labels = {
            contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
            contract.LABEL_RUN_ID: str(self.run_id),
            contract.LABEL_RUN_ATTEMPT: str(self.attempt),
        }
        if self.repository_id is not None:
            labels[contract.LABEL_REPOSITORY_ID] = str(self.repository_id)
        return labels

    def owns(self, labels: Mapping[str, str] | None) -> bool:
        """Whether an object with these labels belongs to this run attempt.

        `delete` checks every listed object again with this, so a server that ignored the
        label selector still could not make it delete another run's pod.
        """
        actual = labels or {}
        return all(actual.get(key) == value for key, value in self.selector_labels().items())


def run_key_from_labels(labels: Mapping[str, str] | None) -> RunKey | None:
    """The run key of an object gpu_runners created, read back from its labels, else None.

    Lets a restarted broker find, in the cluster alone, which run each pod and Secret serves.
    """
    actual = labels or {}
    if actual.get(contract.LABEL_MANAGED_BY) != contract.MANAGED_BY:
        return None
    run_id = actual.get(contract.LABEL_RUN_ID, "")
    attempt = actual.get(contract.LABEL_RUN_ATTEMPT, "")
    repository_id = actual.get(contract.LABEL_REPOSITORY_ID)
    if not (_is_positive(run_id) and _is_positive(attempt)):
        return None
    if repository_id is not None and not _is_positive(repository_id):
        return None
    return RunKey(
        int(repository_id) if repository_id is not None else None, int(run_id), int(attempt)
    )


def _is_positive(text: str) -> bool:
    # isascii: str.isdigit accepts other scripts' digits, which no label value written here has.
    return text.isascii() and text.isdigit() and int(text) > 0


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
