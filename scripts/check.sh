#!/usr/bin/env bash
# Sets up and runs every test and check of the project: lint, types, the test suite (the
# program under Pulumi mocks, the runtime module against fake Kubernetes and GitHub servers,
# the runner image's entrypoint, shellcheck, hadolint, actionlint, strict Kubernetes schemas),
# the rendered manifests and the security scan. The same command runs locally and in CI.
set -euo pipefail

cd "$(dirname "$0")/.."
venv=.venv
python=${PYTHON:-python3}

# The runner entrypoint's tests run it with the tools the image has.
for tool in bash curl jq awk; do
  command -v "$tool" >/dev/null || { echo "missing $tool: install it (e.g. apt-get install $tool)" >&2; exit 1; }
done

if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating $venv"
  "$python" -m venv "$venv"
fi
echo "==> installing the locked dependencies (hashes checked)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  --require-hashes -r requirements-dev.txt
export PATH="$PWD/$venv/bin:$PATH"

echo "==> ruff"
ruff check .

echo "==> mypy"
mypy

echo "==> pytest"
# pytest exits 5 when it collects no test: that fails this script like any other failure.
python -m pytest

echo "==> security scan of what each stack deploys"
for stack in dev prod; do
  python -m scripts.render --stack "$stack" --out "build/rendered/$stack" >/dev/null
  bash scripts/security_scan.sh "build/rendered/$stack"
done

echo "all checks passed"
