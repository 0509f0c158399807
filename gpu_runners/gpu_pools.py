"""The cluster's GPU node pools as the base runner knows them, and checks of a GPU request.

The runner plane sets `GPU_RUNNERS_GPU_POOLS` on the base runner to a JSON list such as
`[{"accelerator": "nvidia-l4", "maxGpusPerPod": 1}]`. With it, a request for an unknown GPU
type or for more GPUs than any node of the pool has is refused before anything is created,
instead of surfacing minutes later as an unschedulable pod. Without it (a cluster this
project did not create) only the form of the request is checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gpu_runners import contract
from gpu_runners.errors import UsageError

# GKE accelerator names are lowercase DNS-label-like words (nvidia-l4, nvidia-tesla-t4); they
# end up as a nodeSelector and a label value, so anything else could not match a node anyway.
_ACCELERATOR = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class GpuPool:
    """One GPU node pool: its accelerator type and the most GPUs one pod can get there."""

    accelerator: str
    max_gpus_per_pod: int


def format_gpu_pools(pools: Sequence[GpuPool]) -> str:
    """The `GPU_RUNNERS_GPU_POOLS` value describing `pools`; `parse_gpu_pools` reads it back."""
    return json.dumps([{"accelerator": pool.accelerator, "maxGpusPerPod": pool.max_gpus_per_pod}
                       for pool in pools])


def parse_gpu_pools(text: str | None) -> tuple[GpuPool, ...]:
    """Parses the `GPU_RUNNERS_GPU_POOLS` JSON; an unset or empty value means "not known".

    Args:
        text: The variable's value.

    Returns:
        The pools, in the order given; empty when the variable is unset or empty.

    Raises:
        UsageError: The value is not a JSON list of {"accelerator", "maxGpusPerPod"} objects.
    """
    if text is None or not text.strip():
        return ()
    expected = (
        f'{contract.ENV_GPU_POOLS} must be a JSON list like '
        '[{"accelerator": "nvidia-l4", "maxGpusPerPod": 1}]'
    )
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{expected}; it is not JSON ({e.msg} at position {e.pos})") from e
    if not isinstance(raw, list):
        raise UsageError(f"{expected}; got a {type(raw).__name__}")
    pools: list[GpuPool] = []
    for index, entry in enumerate(raw):
        accelerator = entry.get("accelerator") if isinstance(entry, dict) else None
        max_gpus = entry.get("maxGpusPerPod") if isinstance(entry, dict) else None
        if (
            not isinstance(accelerator, str)
            or not _ACCELERATOR.match(accelerator)
            or not isinstance(max_gpus, int)
            or isinstance(max_gpus, bool)
            or max_gpus < 1
        ):
            raise UsageError(f"{expected}; entry {index} is {json.dumps(entry)}")
        pools.append(GpuPool(accelerator, max_gpus))
    return tuple(pools)


def parse_gpu_types(values: Sequence[str]) -> tuple[str, ...]:
    """Flattens `--gpu-type a,b --gpu-type c` into the ordered fallback list (a, b, c).

    Args:
        values: Each `--gpu-type` value as typed.

    Returns:
        The distinct types in the order first given; empty means "any GPU pool".

    Raises:
        UsageError: A type is not a lowercase accelerator name.
    """
    types: list[str] = []
    for value in values:
        for item in value.split(","):
            name = item.strip()
            if not _ACCELERATOR.match(name):
                raise UsageError(
                    f"--gpu-type: {name!r} is not an accelerator name such as nvidia-l4 or "
                    "nvidia-tesla-t4 (lowercase letters, digits and dashes)"
                )
            if name not in types:
                types.append(name)
    return tuple(types)


def check_gpu_request(
    gpu_count: int, gpu_types: Sequence[str], pools: Sequence[GpuPool]
) -> None:
    """Refuses a GPU count or type that no known pool can serve.

    Args:
        gpu_count: `--gpus`.
        gpu_types: The ordered `--gpu-type` fallback list; empty for "any pool".
        pools: The known pools; when empty only `gpu_count >= 1` is checked.

    Raises:
        UsageError: Naming `--gpus` or `--gpu-type` and what the pools allow.
    """
    if gpu_count < 1:
        raise UsageError(f"--gpus: {gpu_count} is not allowed; ask for at least 1 GPU")
    if not pools:
        return
    by_type = {pool.accelerator: pool for pool in pools}
    allowed = ", ".join(f"{p.accelerator} (up to {p.max_gpus_per_pod})" for p in pools)
    for gpu_type in gpu_types:
        pool = by_type.get(gpu_type)
        if pool is None:
            raise UsageError(
                f"--gpu-type: {gpu_type!r} is not a GPU pool of this cluster; pools: {allowed}"
            )
        if gpu_count > pool.max_gpus_per_pod:
            raise UsageError(
                f"--gpus: {gpu_count} is more than a {gpu_type} node has "
                f"({pool.max_gpus_per_pod}); pools: {allowed}"
            )
    if not gpu_types and gpu_count > max(pool.max_gpus_per_pod for pool in pools):
        raise UsageError(f"--gpus: {gpu_count} is more than any GPU pool has; pools: {allowed}")
