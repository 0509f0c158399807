"""Per-run GPU runner pods for GitHub Actions on Kubernetes; no Pulumi here.

The base runner runs `python3 -m gpu_runners spawn|delete|reap|list` (see `cli`); the same
steps are importable: `spawn.spawn`, `delete.delete_run`, `reap.reap`,
`listing.list_runner_pods`, with `pod_spec` building the objects they send. This package
imports nothing on its own, so the Pulumi program can import `gpu_runners.contract` without
the Kubernetes client.
"""
