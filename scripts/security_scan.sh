#!/usr/bin/env bash
# Scan what the stack deploys with checkov, offline: the rendered Kubernetes objects, the runner
# and broker images' Dockerfiles, this repository's workflows and the example ML-repository
# workflows.
#
# Usage: scripts/security_scan.sh <rendered-k8s-dir>
#   <rendered-k8s-dir>  YAML files of the stack's Kubernetes objects
#                       (python -m scripts.render --stack dev --out <dir>)
# Environment:
#   CHECKOV_VENV        virtualenv holding checkov (default: .venv-checkov in the repository);
#                       created with the pinned version when missing.
#
# Fails when any check fails, when a skipped check carries no justification, or when a
# framework scanned nothing (a misplaced file is otherwise silently ignored). A check is skipped
# only where it applies: a `checkov.io/skip<N>: CKV_K8S_<n>=<reason>` annotation on the
# Kubernetes object, or a `# checkov:skip=<CHECK>: <reason>` comment in the Dockerfile or
# workflow.
set -euo pipefail

readonly CHECKOV_VERSION="3.3.30"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CHECKOV_VENV:-${repo_root}/.venv-checkov}"

if [[ $# -ne 1 ]]; then
    echo "usage: $0 <rendered-k8s-dir>" >&2
    exit 2
fi
rendered="$1"
if [[ ! -d "${rendered}" ]] || ! compgen -G "${rendered}/*.y*ml" > /dev/null; then
    echo "error: <rendered-k8s-dir> '${rendered}' holds no .yaml/.yml files;" \
         "render them with: python -m scripts.render --stack dev --out <dir>" >&2
    exit 2
fi
for required in docker/Dockerfile docker/broker.Dockerfile .github/workflows examples/workflows; do
    if [[ ! -e "${repo_root}/${required}" ]]; then
        echo "error: ${required} is missing; the scan covers it and skips nothing" >&2
        exit 2
    fi
done

# checkov pins packages (boto3, packaging, ...) that clash with the Pulumi SDKs, so it gets
# a virtualenv of its own.
if ! "${venv}/bin/checkov" --version 2> /dev/null | grep -qx "${CHECKOV_VERSION}"; then
    echo "Installing checkov ${CHECKOV_VERSION} into ${venv}" >&2
    python3 -m venv "${venv}"
    "${venv}/bin/python" -m pip install --quiet --disable-pip-version-check \
        "checkov==${CHECKOV_VERSION}"
fi

# checkov reads a workflow only under a .github/workflows/ directory, so the example workflows
# are staged under one; the staged tree keeps each file's origin visible in the report.
stage="$(mktemp -d)"
trap 'rm -rf "${stage}"' EXIT
mkdir -p "${stage}/rendered" "${stage}/docker" "${stage}/.github/workflows" \
         "${stage}/examples/.github/workflows"
cp -R "${rendered}/." "${stage}/rendered/"
cp "${repo_root}/docker/Dockerfile" "${repo_root}/docker/broker.Dockerfile" "${stage}/docker/"
cp -R "${repo_root}/.github/workflows/." "${stage}/.github/workflows/"
cp -R "${repo_root}/examples/workflows/." "${stage}/examples/.github/workflows/"

status=0
# --skip-download: no network (otherwise it fetches guidelines from the Prisma Cloud API).
(cd "${stage}" && "${venv}/bin/checkov" --directory . \
    --framework kubernetes dockerfile github_actions \
    --skip-download --compact --output json > "${stage}/results.json") || status=$?
# checkov exits 1 when a check failed; anything else means it did not run properly.
if [[ ${status} -gt 1 ]]; then
    echo "error: checkov exited with status ${status}" >&2
    exit "${status}"
fi

"${venv}/bin/python" - "${stage}/results.json" <<'PYTHON'
"""Print the scan's outcome per framework; exit 1 on failures, unjustified skips, no input."""
import json
import sys

EXPECTED = ("kubernetes", "dockerfile", "github_actions")
# checkov's text for a skip without a reason.
NO_REASON = {"", "No comment provided"}

with open(sys.argv[1], encoding="utf-8") as results_file:
    results = json.load(results_file)
reports = {r["check_type"]: r for r in (results if isinstance(results, list) else [results])
           if "check_type" in r}
problems = 0
for framework in EXPECTED:
    report = reports.get(framework)
    summary = report["summary"] if report else {"passed": 0, "failed": 0, "skipped": 0}
    print(f"{framework}: {summary['passed']} passed, {summary['failed']} failed, "
          f"{summary['skipped']} skipped")
    if not summary["passed"] + summary["failed"] + summary["skipped"]:
        print(f"  FAILED: no {framework} file was scanned")
        problems += 1
        continue
    for check in report["results"]["failed_checks"]:
        lines = "-".join(map(str, check["file_line_range"]))
        print(f"  FAILED {check['check_id']} {check['check_name']}: {check['resource']} "
              f"({check['file_path'].lstrip('/')}:{lines})")
        problems += 1
    for check in report["results"]["skipped_checks"]:
        reason = (check["check_result"].get("suppress_comment") or "").strip()
        print(f"  skipped {check['check_id']} on {check['resource']}: {reason or '(no reason)'}")
        if reason in NO_REASON:
            print(f"  FAILED: the skip of {check['check_id']} gives no reason")
            problems += 1
    for error in report["results"].get("parsing_errors", []):
        print(f"  FAILED: could not parse {error}")
        problems += 1
print("security scan: " + ("passed" if not problems else f"{problems} problem(s)"))
sys.exit(1 if problems else 0)
PYTHON
