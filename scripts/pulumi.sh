#!/usr/bin/env bash
# Runs a Pulumi command on one stack with everything it needs set up:
#   scripts/pulumi.sh up dev        (also: preview, destroy, refresh, config, stack output ...)
# It creates the project's virtualenv with the pinned dependencies, uses your Pulumi backend
# if you have one (PULUMI_BACKEND_URL or `pulumi login`), otherwise a local file backend in
# .pulumi-state/, and creates the stack on first use.
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
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt

if [ -z "${PULUMI_BACKEND_URL:-}" ] && ! pulumi whoami >/dev/null 2>&1; then
  mkdir -p .pulumi-state
  export PULUMI_BACKEND_URL="file://$PWD/.pulumi-state"
  echo "no Pulumi backend configured: using the local file backend in .pulumi-state/" >&2
fi

pulumi stack select --create "$stack" >/dev/null
exec pulumi "$command" --stack "$stack" "$@"
