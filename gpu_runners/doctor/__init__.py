"""`python -m gpu_runners.doctor`: proves a live installation after `pulumi up`.

It checks what only the real cluster and GitHub can confirm (nodes and their labels, quota,
the broker and base runner, the runner namespace's network, the runner image, the GitHub
credential and the repository ids, the runner version's age), then runs a GPU smoke pod on
each pool and tells where its cold start went. Modules: `report` (results and their
rendering); `cluster_facts`/`cluster_checks`, `github_checks` and `runner_version` (pure checks
over fetched facts); `pods` (the probe and smoke pods it builds), `probe_script` (what the probe
runs inside the image), `probe` and `smoke` (what their runs say); `pod_watch` (following the
pods to their end); `clients` (the reads it adds to the Kubernetes and GitHub clients);
`session` (the order of it all, and the cleanup); `cli` (options and output).
"""
