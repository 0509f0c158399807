"""The runner broker: the only holder of the GitHub credential and of the Kubernetes rights over
GPU runner pods. Jobs prove their run with their GitHub Actions OIDC token; the broker spawns,
watches and deletes that run's runner, and reaps what cancelled runs leave behind.

Layout: `oidc` verifies tokens; `policy` applies the stack's limits to what a job asks;
`gpu_cap` holds each repository to its GPU cap at every pod create; `runs` keeps each run's
operation idempotent and runs it in worker threads; `app` wires the HTTP API
(`gpu_runners.broker_api`) to them; `reconcile` is the reaper loop; `metrics` the Prometheus
series; `settings` reads the environment the stack sets; `__main__` serves it all
(`python -m gpu_runners.broker`).
"""
