#!/usr/bin/env bash
# Runs a Pulumi command on one stack with everything it needs set up:
#   scripts/pulumi.sh up dev        (also: preview, destroy, refresh, config, stack output ...)
# It creates the project's virtualenv with the pinned dependencies, uses your Pulumi backend
# if you have one (PULUMI_BACKEND_URL or `pulumi login`), otherwise a local file backend in
# .pulumi-state/ (with a warning: CI's preview and other machines cannot see that state), and
# creates the stack on first use.
set -euo pipefail

usage() { echo "usage: $0 <up|preview|destroy|refresh|...> <stack> [pulumi args...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
command=$1 stack=$2
shift 2

cd "$(dirname "$0")/.."
command -v pulumi >/dev/null || { echo "pulumi CLI not found: https://www.pulumi.com/docs/install/" >&2; exit 1; }
if [ ! -f "Pulumi.$stack.yaml" ]; then
  stacks=(Pulumi.*.yaml)
  stacks=("${stacks[@]#Pulumi.}")
  echo "no Pulumi.$stack.yaml; the stacks here are: ${stacks[*]%.yaml}" >&2
  exit 2
fi

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# The hashed lock: every dependency at its tested version, each file checked against its hash.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.txt

if [ -z "${PULUMI_BACKEND_URL:-}" ] && ! pulumi whoami >/dev/null 2>&1; then
  mkdir -p .pulumi-state
  export PULUMI_BACKEND_URL="file://$PWD/.pulumi-state"
  # Loud on purpose: a stack kept here is invisible to preview.yaml and to every other machine,
  # which would then create everything a second time.
  cat >&2 <<WARNING
WARNING: no Pulumi backend is configured (PULUMI_BACKEND_URL is unset and pulumi is not
WARNING: logged in): this stack's state goes to .pulumi-state/ on this machine only.
WARNING: preview.yaml in CI cannot see it, nor can anyone else; an 'up' elsewhere would
WARNING: create every resource a second time. For a shared stack, use a bucket:
WARNING:   export PULUMI_BACKEND_URL=gs://<bucket>   (or: pulumi login gs://<bucket>)
WARNING: commit Pulumi.$stack.yaml, and set the repository variable PULUMI_BACKEND_URL
WARNING: to the same URL (README: "State backend").
WARNING
fi

pulumi stack select --create "$stack" >/dev/null
exec pulumi "$command" --stack "$stack" "$@"
