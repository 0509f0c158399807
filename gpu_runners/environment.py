"""Defaults the base runner's environment provides to every command.

The runner plane sets these variables on the base runner (names in `contract`), so a
workflow step can say `python3 -m gpu_runners spawn --gpus 1` and nothing else. Options
always win over the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gpu_runners import contract
from gpu_runners.errors import UsageError
from gpu_runners.pod_options import DEFAULT_MAX_RUNTIME_SECONDS

#: The namespace of the pod this process runs in, as every pod with a ServiceAccount sees it.
SERVICE_ACCOUNT_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def resolve_namespace(
    option: str | None,
    environ: Mapping[str, str],
    *,
    own_namespace_file: Path = SERVICE_ACCOUNT_NAMESPACE_FILE,
) -> str:
    """The GPU pods' namespace: the option, GPU_RUNNERS_NAMESPACE, this pod's, the default.

    The base runner's own namespace comes before the project default because its Role, and
    so its right to create pods, is limited to that namespace.

    Args:
        option: `--namespace`.
        environ: The process environment.
        own_namespace_file: Where a pod reads its own namespace.
    """
    if option:
        return option
    if environ.get(contract.ENV_NAMESPACE):
        return environ[contract.ENV_NAMESPACE]
    if own_namespace_file.is_file():
        return own_namespace_file.read_text(encoding="utf-8").strip()
    return contract.DEFAULT_NAMESPACE


def default_image(environ: Mapping[str, str]) -> str:
    """The runner image GPU pods run unless `--image` says otherwise ("" if unset)."""
    return environ.get(contract.ENV_IMAGE, "").strip()


def default_max_runtime_seconds(environ: Mapping[str, str]) -> int:
    """GPU_RUNNERS_MAX_RUNTIME_MINUTES in seconds, or the built-in default (6 h).

    Raises:
        UsageError: The variable is set but is not a positive whole number of minutes.
    """
    text = environ.get(contract.ENV_MAX_RUNTIME_MINUTES, "").strip()
    if not text:
        return DEFAULT_MAX_RUNTIME_SECONDS
    if not text.isdigit() or int(text) == 0:
        raise UsageError(
            f"{contract.ENV_MAX_RUNTIME_MINUTES}={text!r} is not a positive number of minutes"
        )
    return int(text) * 60
