"""Per-run GPU runners for GitHub Actions on Kubernetes; no Pulumi here.

Three parts, each easy to find:

- the thin client a workflow job runs, `python3 -m gpu_runners spawn|delete|list` (`cli`,
  `broker_client`): standard library only, it asks the broker with the job's OIDC token;
- the broker (`broker/`), the only holder of the GitHub credential and of the Kubernetes rights,
  which runs `spawn.spawn`, `delete.delete_run` and `reap.reap` for verified jobs;
- the pure pod and run model they share (`broker_api`, `contract`, `run_identity`,
  `pod_options`, `pod_spec`).

This package imports nothing on its own, so the client starts fast and the Pulumi program can
import `gpu_runners.contract` without the Kubernetes client.
"""
