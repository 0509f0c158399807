"""`python -m gpu_runners.doctor`: options, the token, the clients, the report and exit code.

Run by an operator after `pulumi up`, from their own machine, with their kubeconfig and a
GitHub token. Progress goes to stderr; the table (or `--json`) to stdout. Exit codes: 0 every
check passed, 1 a check failed, 2 bad options, 128+N interrupted by signal N (the pods it
created are deleted first).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from gpu_runners import contract
from gpu_runners.cli import interrupt_on_signals
from gpu_runners.doctor.clients import ClusterClient
from gpu_runners.doctor.report import render_json, render_table
from gpu_runners.doctor.session import DoctorSettings, examine
from gpu_runners.errors import GpuRunnersError, Interrupted, UsageError
from gpu_runners.github_api import Token, api_url_from
from gpu_runners.kube import load_api_client
from gpu_runners.progress import ProgressLog

DEFAULT_TIMEOUT_SECONDS = 900


def build_parser() -> argparse.ArgumentParser:
    """The doctor's options."""
    parser = argparse.ArgumentParser(
        prog="python -m gpu_runners.doctor",
        description="Check a live GPU runners installation: cluster, network, image, GitHub "
                    "credential, and a GPU smoke pod on each pool.",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG or "
                                             "~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context (default: its current one)")
    parser.add_argument("--namespace", default=contract.DEFAULT_NAMESPACE,
                        help="the runner namespace (default: %(default)s)")
    parser.add_argument("--broker-namespace", default=contract.DEFAULT_BROKER_NAMESPACE,
                        help="the broker's namespace (default: %(default)s)")
    parser.add_argument("--repository", help="owner/name the runners serve (default: the "
                                             "broker's GITHUB_REPOSITORY)")
    parser.add_argument("--token-file", type=Path,
                        help=f"file holding the GitHub token (default: "
                             f"${contract.ENV_GITHUB_TOKEN})")
    parser.add_argument("--api-url", help="GitHub API URL (default: GITHUB_API_URL or "
                                          "https://api.github.com)")
    parser.add_argument("--skip-smoke", action="store_true",
                        help="run no GPU smoke pod (no scale-up, no GPU cost)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS,
                        help="seconds to wait for the probe pod and for each batch of smoke "
                             "pods (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def load_doctor_token(token_file: Path | None, environ: Mapping[str, str]) -> Token:
    """The token from `--token-file`, else $GITHUB_TOKEN.

    Raises:
        UsageError: The file cannot be read or is empty, or neither is given.
    """
    if token_file is not None:
        try:
            value = token_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise UsageError(f"--token-file {token_file}: cannot be read: {e.strerror}") from e
        if not value:
            raise UsageError(f"--token-file {token_file}: is empty")
        return Token(value, f"file {token_file}")
    value = environ.get(contract.ENV_GITHUB_TOKEN, "").strip()
    if not value:
        raise UsageError(f"no GitHub token: give --token-file or set "
                         f"{contract.ENV_GITHUB_TOKEN}")
    return Token(value, f"env {contract.ENV_GITHUB_TOKEN}")


def _settings(args: argparse.Namespace, environ: Mapping[str, str]) -> DoctorSettings:
    if args.timeout <= 0:
        raise UsageError(f"--timeout: {args.timeout} is not allowed; give seconds above 0")
    if args.repository is not None and args.repository.count("/") != 1:
        raise UsageError(f"--repository: {args.repository!r} is not owner/name")
    return DoctorSettings(
        namespace=args.namespace,
        broker_namespace=args.broker_namespace,
        repository=args.repository,
        api_url=args.api_url or api_url_from(environ),
        skip_smoke=args.skip_smoke,
        timeout=args.timeout,
    )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Runs the doctor; returns the exit code."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    log = ProgressLog(sys.stderr)
    try:
        settings = _settings(args, environ)
        token = load_doctor_token(args.token_file, environ)
        api_client = load_api_client(kubeconfig=args.kubeconfig, context=args.context,
                                     environ=environ)
        with interrupt_on_signals():
            examination = examine(settings, ClusterClient(api_client), token, log=log)
    except Interrupted as e:
        print(f"doctor: interrupted by signal {e.signum}; its pods were deleted",
              file=sys.stderr, flush=True)
        return e.exit_code
    except GpuRunnersError as e:
        print(f"doctor: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    sys.stdout.write(render_json(examination) if args.json else render_table(examination))
    sys.stdout.flush()
    return examination.exit_code
