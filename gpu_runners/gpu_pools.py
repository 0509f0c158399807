"""The cluster's GPU node pools as the base runner knows them, and checks of a GPU request.

The stack sets `GPU_RUNNERS_GPU_POOLS` on the broker to a JSON list such as
`[{"accelerator": "nvidia-l4", "maxGpusPerPod": 1, "name": "l4-spot", "spot": true,
"onDemandFallback": "l4"}]`. With it, a request for an unknown GPU type or for more GPUs than
any node of the pool has is refused before anything is created, instead of surfacing minutes
later as an unschedulable pod; and a run whose Spot node was reclaimed can be retried on the
pool's on-demand fallback. Without it (a cluster this project did not create) only the form of
the request is checked. "name", "spot" and "onDemandFallback" are optional: a value written
before they existed still parses.
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


# GKE node pool names (the stack's gpuPools[].name): DNS-1123 labels of at most 40 characters.
_POOL_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")


@dataclass(frozen=True)
class GpuPool:
    """One GPU node pool: its accelerator type and the most GPUs one pod can get there.

    Attributes:
        accelerator: The GKE accelerator type, e.g. nvidia-l4.
        max_gpus_per_pod: GPUs of one node of the pool.
        name: The node pool's name (its nodes' `cloud.google.com/gke-nodepool` label); "" when
            not known (a value written before pools were named, or another cluster).
        spot: Whether the pool's nodes are Spot VMs, which Google may reclaim at any time.
        on_demand_fallback: `name` of the on-demand pool where retries after a Spot preemption
            of this pool run, or None to retry in this pool.
    """

    accelerator: str
    max_gpus_per_pod: int
    name: str = ""
    spot: bool = False
    on_demand_fallback: str | None = None


def format_gpu_pools(pools: Sequence[GpuPool]) -> str:
    """The `GPU_RUNNERS_GPU_POOLS` value describing `pools`; `parse_gpu_pools` reads it back.

    "name", "spot" and "onDemandFallback" are written only when set, so a nameless pool is
    written in the two-key form.
    """
    entries: list[dict[str, object]] = []
    for pool in pools:
        entry: dict[str, object] = {"accelerator": pool.accelerator,
                                    "maxGpusPerPod": pool.max_gpus_per_pod}
        if pool.name:
            entry["name"] = pool.name
        if pool.spot:
            entry["spot"] = True
        if pool.on_demand_fallback is not None:
            entry["onDemandFallback"] = pool.on_demand_fallback
        entries.append(entry)
    return json.dumps(entries)


def fallback_pool(pools: Sequence[GpuPool], pool_name: str) -> GpuPool | None:
    """The on-demand pool where retries after a Spot preemption of pool `pool_name` run.

    Args:
        pools: The known pools (`parse_gpu_pools`, which checked the fallbacks).
        pool_name: The name of the pool whose node was reclaimed.

    Returns:
        The fallback pool; None when `pool_name` is not a known pool or names no fallback
        (the retry then stays in its pool).
    """
    pool = next((p for p in pools if p.name and p.name == pool_name), None)
    if pool is None or pool.on_demand_fallback is None:
        return None
    return next((p for p in pools if p.name == pool.on_demand_fallback), None)


def parse_gpu_pools(text: str | None) -> tuple[GpuPool, ...]:
    """Parses the `GPU_RUNNERS_GPU_POOLS` JSON; an unset or empty value means "not known".

    Args:
        text: The variable's value.

    Returns:
        The pools, in the order given; empty when the variable is unset or empty.

    Raises:
        UsageError: The value is not a JSON list of {"accelerator", "maxGpusPerPod"} objects
            with optional "name", "spot" and "onDemandFallback"; or a fallback does not name
            another, on-demand pool of the same accelerator with at least as many GPUs.
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
    pools = tuple(_parse_entry(expected, index, entry) for index, entry in enumerate(raw))
    names = [pool.name for pool in pools if pool.name]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UsageError(f"{contract.ENV_GPU_POOLS}: several entries are named "
                         f"{', '.join(duplicates)}; pool names are unique")
    for index, pool in enumerate(pools):
        problem = _fallback_problem(pool, pools)
        if problem is not None:
            raise UsageError(f"{contract.ENV_GPU_POOLS}: entry {index} ({pool.name}): "
                             f"onDemandFallback {pool.on_demand_fallback!r} {problem}")
    return pools


_KEYS = frozenset({"accelerator", "maxGpusPerPod", "name", "spot", "onDemandFallback"})


def _parse_entry(expected: str, index: int, entry: object) -> GpuPool:
    """One entry of the list, or UsageError naming it."""
    if not isinstance(entry, dict):
        raise UsageError(f"{expected}; entry {index} is {json.dumps(entry)}")
    accelerator = entry.get("accelerator")
    max_gpus = entry.get("maxGpusPerPod")
    if (
        not isinstance(accelerator, str)
        or not _ACCELERATOR.match(accelerator)
        or not isinstance(max_gpus, int)
        or isinstance(max_gpus, bool)
        or max_gpus < 1
    ):
        raise UsageError(f"{expected}; entry {index} is {json.dumps(entry)}")
    where = f"{contract.ENV_GPU_POOLS}: entry {index} ({json.dumps(entry)})"
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise UsageError(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: "
                         + ", ".join(sorted(_KEYS)))
    name = entry.get("name", "")
    if not isinstance(name, str) or name and not _POOL_NAME.match(name):
        raise UsageError(f"{where}: \"name\" must be a node pool name (lowercase letters, "
                         "digits and '-', at most 40 characters)")
    spot = entry.get("spot", False)
    if not isinstance(spot, bool):
        raise UsageError(f"{where}: \"spot\" must be true or false")
    fallback = entry.get("onDemandFallback")
    if fallback is not None and (not isinstance(fallback, str) or not _POOL_NAME.match(fallback)):
        raise UsageError(f"{where}: \"onDemandFallback\" must be the name of another pool")
    if fallback is not None and not name:
        raise UsageError(f"{where}: a pool with \"onDemandFallback\" needs its \"name\"")
    return GpuPool(accelerator, max_gpus, name=name, spot=spot, on_demand_fallback=fallback)


def _fallback_problem(pool: GpuPool, pools: Sequence[GpuPool]) -> str | None:
    """Why `pool`'s fallback is not one (the stack config's rules), or None."""
    if pool.on_demand_fallback is None:
        return None
    if not pool.spot:
        return "is set on an on-demand pool (\"spot\" is not true)"
    if pool.on_demand_fallback == pool.name:
        return "names the pool itself"
    target = next((p for p in pools if p.name == pool.on_demand_fallback), None)
    if target is None:
        return "names no pool of the list"
    if target.spot:
        return "names a Spot pool; it must be on-demand"
    if target.accelerator != pool.accelerator:
        return f"has {target.accelerator}, not {pool.accelerator}"
    if target.max_gpus_per_pod < pool.max_gpus_per_pod:
        return (f"has {target.max_gpus_per_pod} GPU(s) per node, fewer than this pool's "
                f"{pool.max_gpus_per_pod}")
    return None


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
    # Several pools may share an accelerator (a Spot pool and its on-demand fallback): a
    # request fits the type if it fits its largest node.
    by_type: dict[str, int] = {}
    for pool in pools:
        by_type[pool.accelerator] = max(by_type.get(pool.accelerator, 0), pool.max_gpus_per_pod)
    allowed = ", ".join(f"{accelerator} (up to {most})" for accelerator, most in by_type.items())
    for gpu_type in gpu_types:
        most = by_type.get(gpu_type)
        if most is None:
            raise UsageError(
                f"--gpu-type: {gpu_type!r} is not a GPU pool of this cluster; pools: {allowed}"
            )
        if gpu_count > most:
            raise UsageError(
                f"--gpus: {gpu_count} is more than a {gpu_type} node has "
                f"({most}); pools: {allowed}"
            )
    if not gpu_types and gpu_count > max(by_type.values()):
        raise UsageError(f"--gpus: {gpu_count} is more than any GPU pool has; pools: {allowed}")


def fallback_pools(pools: Sequence[GpuPool]) -> tuple[str, ...]:
    """Names of the pools some Spot pool names as its on-demand fallback: kept for retries
    after a preemption, so first attempts stay off them."""
    return tuple(sorted({pool.on_demand_fallback for pool in pools if pool.on_demand_fallback}))
