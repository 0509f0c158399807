#!/usr/bin/env bash
# Regenerates the hashed requirement locks from the pins people edit:
#   requirements.in        -> requirements.txt          (the program: scripts/pulumi.sh, preview.yaml)
#   requirements-dev.in    -> requirements-dev.txt      (every check: scripts/check.sh, CI)
#   policy/requirements.in -> policy/requirements.txt   (the policy pack's virtualenv)
# Each lock lists every dependency at the version constraints.txt records as tested, with the
# SHA-256 of each of its files on PyPI, and is installed with --require-hashes: a file that
# changes on the index, or a dependency nobody pinned, fails the install instead of running.
# Run it after changing a pin (and constraints.txt), and commit the locks with the pins.
set -euo pipefail

cd "$(dirname "$0")/.."
uv=${UV:-.venv/bin/uv}
[ -x "$uv" ] || { echo "uv not found at $uv: run scripts/check.sh once (it installs uv)" >&2; exit 1; }

lock() {
  # --universal: one lock for every platform and Python >= 3.11 (CI, developers, the image).
  "$uv" pip compile --quiet --universal --python-version 3.11 --generate-hashes \
    --constraint constraints.txt --output-file "$2" "$1"
}
lock requirements.in requirements.txt
lock requirements-dev.in requirements-dev.txt
lock policy/requirements.in policy/requirements.txt
