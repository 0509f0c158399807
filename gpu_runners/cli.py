"""The command line: `python3 -m gpu_runners spawn|delete|reap|list`.

Arguments are checked, and the token found, before the Kubernetes client is even imported:
a typo costs milliseconds and creates nothing. Failures print one line (as a GitHub
annotation inside Actions) and exit with the code the help lists.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING

from gpu_runners import contract
from gpu_runners.environment import (
    default_image,
    default_max_runtime_seconds,
    resolve_namespace,
)
from gpu_runners.errors import GpuRunnersError, Interrupted, UsageError
from gpu_runners.github_api import (
    DEFAULT_RUNNER_GROUP_ID,
    GitHubClient,
    api_url_from,
    load_token,
    scope_from,
)
from gpu_runners.gpu_pools import check_gpu_request, parse_gpu_pools, parse_gpu_types
from gpu_runners.pod_options import (
    DEFAULT_CPU,
    DEFAULT_MEMORY,
    DEFAULT_SHM_SIZE,
    RunnerPodOptions,
)
from gpu_runners.progress import ProgressLog
from gpu_runners.quantities import parse_duration_seconds
from gpu_runners.run_identity import resolve_run_identity

if TYPE_CHECKING:  # the Kubernetes client costs ~1 s to import; only commands that talk pay it
    from gpu_runners.kube import KubeClient

EXIT_CODES = """\
exit codes:
  0    success
  1    unexpected error, or reap could not remove everything
  2    bad arguments or environment (nothing was created)
  3    GitHub API error: token, scope, repository, rate limit
  4    Kubernetes API error: credentials, RBAC, namespace
  5    spawn: no GPU capacity and no scale-up coming, for every --gpu-type
  6    spawn: the runner image cannot be pulled
  7    spawn: the pod failed or ended before its runner came online
  8    spawn: the runner was not online within --timeout
  130  interrupted by SIGINT; spawn removed what it had created
  143  terminated by SIGTERM; spawn removed what it had created
"""

Command = Callable[[argparse.Namespace, Mapping[str, str]], int]


def _common_parsers() -> tuple[argparse.ArgumentParser, ...]:
    cluster = argparse.ArgumentParser(add_help=False)
    group = cluster.add_argument_group("cluster")
    group.add_argument("--namespace", help=f"namespace of the GPU pods (default: "
                       f"${contract.ENV_NAMESPACE}, this pod's namespace, "
                       f"{contract.DEFAULT_NAMESPACE})")
    group.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster ServiceAccount, "
                       "else $KUBECONFIG or ~/.kube/config)")
    group.add_argument("--context", help="kubeconfig context (default: its current context)")

    github = argparse.ArgumentParser(add_help=False)
    group = github.add_argument_group("GitHub")
    group.add_argument("--repository", help=f"owner/name (default: ${contract.ENV_REPOSITORY})")
    group.add_argument("--org", help=f"register organisation runners instead (default: "
                       f"${contract.ENV_ORGANIZATION})")

    run = argparse.ArgumentParser(add_help=False)
    group = run.add_argument_group("workflow run")
    group.add_argument("--run-id", help=f"workflow run id (default: ${contract.ENV_RUN_ID})")
    group.add_argument("--run-attempt", help=f"run attempt (default: ${contract.ENV_RUN_ATTEMPT}, "
                       "else 1)")
    return cluster, github, run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all four commands."""
    cluster, github, run = _common_parsers()
    parser = argparse.ArgumentParser(
        prog="python3 -m gpu_runners",
        description="Per-run GPU runner pods for GitHub Actions on Kubernetes.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    spawn = commands.add_parser(
        "spawn", parents=[cluster, github, run], epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="start this run's GPU runner pod and wait until its runner is online",
        description="Start this run's GPU runner pod and wait until its runner is online; "
        "writes label=gpu-<run_id>-<attempt> to $GITHUB_OUTPUT. Durations are whole numbers "
        "with s, m or h (a bare number means minutes).",
    )
    spawn.add_argument("--gpus", type=int, default=1, help="GPUs for the runner (default: 1)")
    spawn.add_argument("--gpu-type", action="append", metavar="TYPE[,TYPE...]",
                       help="GKE accelerator, e.g. nvidia-l4; several are tried in order when "
                       "one has no capacity (default: any GPU pool)")
    spawn.add_argument("--cpu", default=DEFAULT_CPU, help=f"CPU (default: {DEFAULT_CPU})")
    spawn.add_argument("--memory", default=DEFAULT_MEMORY,
                       help=f"memory, e.g. 16Gi (default: {DEFAULT_MEMORY})")
    spawn.add_argument("--shm-size", default=DEFAULT_SHM_SIZE,
                       help=f"size of /dev/shm, part of --memory (default: {DEFAULT_SHM_SIZE})")
    spawn.add_argument("--max-runtime", metavar="DURATION",
                       help="the pod is killed after this, e.g. 6h (default: "
                       f"${contract.ENV_MAX_RUNTIME_MINUTES} minutes, else 6h)")
    spawn.add_argument("--timeout", default="20m", metavar="DURATION",
                       help="give up if the runner is not online by then (default: 20m)")
    spawn.add_argument("--scale-up-grace", default="120s", metavar="DURATION",
                       help="how long an unschedulable pod may wait for the autoscaler to "
                       "start a scale-up (default: 120s)")
    spawn.add_argument("--image", help=f"runner image (default: ${contract.ENV_IMAGE})")
    spawn.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                       help="extra pod label (repeatable)")
    spawn.add_argument("--runner-group", help="organisation runner group name or id "
                       "(default: Default)")
    spawn.set_defaults(run=_spawn)

    delete = commands.add_parser(
        "delete", parents=[cluster, github, run], epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="remove this run's pod, secret and runner registration (already gone is fine)",
    )
    delete.add_argument("--timeout", default="60s", metavar="DURATION",
                        help="how long to wait for a busy runner to stop (default: 60s)")
    delete.set_defaults(run=_delete)

    reap = commands.add_parser(
        "reap", parents=[cluster, github], epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="remove finished, expired and orphaned GPU pods and runner registrations",
    )
    reap.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    reap.add_argument("--page-size", type=int, default=500,
                      help="pods per list request (default: 500)")
    reap.set_defaults(run=_reap)

    listing = commands.add_parser(
        "list", parents=[cluster], help="show the GPU runner pods",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listing.set_defaults(run=_list)
    return parser


# --- commands ------------------------------------------------------------------------------------


def _labels(values: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--label: {item!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def _github(args: argparse.Namespace, environ: Mapping[str, str],
            repository: str | None = None) -> GitHubClient:
    scope = scope_from(repository=args.repository or repository, organization=args.org,
                       environ=environ)
    return GitHubClient(load_token(environ), scope, api_url=api_url_from(environ))


def _kube(args: argparse.Namespace, environ: Mapping[str, str]) -> KubeClient:
    from gpu_runners.kube import KubeClient, load_api_client

    return KubeClient(load_api_client(kubeconfig=args.kubeconfig, context=args.context,
                                      environ=environ))


def _spawn(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    identity = resolve_run_identity(run_id=args.run_id, attempt=args.run_attempt,
                                    repository=args.repository, environ=environ)
    gpu_types = parse_gpu_types(args.gpu_type or [])
    check_gpu_request(args.gpus, gpu_types, parse_gpu_pools(environ.get(contract.ENV_GPU_POOLS)))
    max_runtime = (parse_duration_seconds(args.max_runtime, "--max-runtime")
                   if args.max_runtime else default_max_runtime_seconds(environ))
    pod = RunnerPodOptions(
        namespace=resolve_namespace(args.namespace, environ),
        image=args.image or default_image(environ),
        gpu_count=args.gpus,
        cpu=args.cpu,
        memory=args.memory,
        shm_size=args.shm_size,
        max_runtime_seconds=max_runtime,
        image_pull_secret=environ.get(contract.ENV_IMAGE_PULL_SECRET) or None,
        extra_labels=_labels(args.label),
    )
    timeout = parse_duration_seconds(args.timeout, "--timeout")
    grace = parse_duration_seconds(args.scale_up_grace, "--scale-up-grace")
    github = _github(args, environ, identity.repository)
    group = args.runner_group

    from gpu_runners.spawn import SpawnRequest, spawn
    from gpu_runners.step_outputs import write_spawn_outputs

    log = ProgressLog(sys.stdout)
    runner_group_id = DEFAULT_RUNNER_GROUP_ID
    if group is not None:
        runner_group_id = int(group) if group.isdigit() else github.runner_group_id(group)
    request = SpawnRequest(
        identity=identity, pod=pod, gpu_types=gpu_types, wait_timeout_seconds=timeout,
        scale_up_grace_seconds=grace, runner_group_id=runner_group_id,
    )
    result = spawn(request, kube=_kube(args, environ), github=github, log=log)
    write_spawn_outputs(result, environ)
    log.line(f"ready: runs-on: {result.label}")
    return 0


def _delete(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    identity = resolve_run_identity(run_id=args.run_id, attempt=args.run_attempt,
                                    repository=args.repository, environ=environ)
    timeout = parse_duration_seconds(args.timeout, "--timeout")
    namespace = resolve_namespace(args.namespace, environ)
    github = _github(args, environ, identity.repository)

    from gpu_runners.delete import delete_run

    delete_run(identity, namespace=namespace, kube=_kube(args, environ), github=github,
               log=ProgressLog(sys.stdout), timeout_seconds=timeout)
    return 0


def _reap(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if args.page_size < 1:
        raise UsageError(f"--page-size: {args.page_size} is not a positive number of pods")
    namespace = resolve_namespace(args.namespace, environ)
    github = _github(args, environ)

    from gpu_runners.reap import reap

    report = reap(namespace=namespace, kube=_kube(args, environ), github=github,
                  log=ProgressLog(sys.stdout), dry_run=args.dry_run, page_size=args.page_size)
    return 1 if report.failures else 0


def _list(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    namespace = resolve_namespace(args.namespace, environ)

    from gpu_runners.listing import format_table, list_runner_pods

    rows = list_runner_pods(_kube(args, environ), namespace, datetime.now(UTC))
    if not rows:
        print(f"no GPU runner pods in namespace {namespace}")
    else:
        print(format_table(rows))
    return 0


# --- signals and failures ------------------------------------------------------------------------


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Turns the first SIGINT/SIGTERM into `Interrupted` in the main thread.

    Later signals are ignored: GitHub Actions sends SIGINT, then SIGTERM 7.5 s later, and the
    cleanup the first one started must not be cut short by the second.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if received:
            return
        received.append(signum)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _report(command: str, error: BaseException, environ: Mapping[str, str]) -> None:
    reason = " ".join(str(error).split()) or type(error).__name__
    if environ.get("GITHUB_ACTIONS") == "true":
        # A workflow command: Actions shows it as an error annotation on the run.
        print(f"::error title=gpu_runners {command}::{reason}", file=sys.stderr, flush=True)
    else:
        print(f"error: {command}: {reason}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Runs one command; returns its exit code (see EXIT_CODES).

    Args:
        argv: Arguments without the program name (default: sys.argv[1:]).
        environ: The environment (default: os.environ).

    Returns:
        The process exit code.
    """
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    command: Command = args.run
    try:
        with interrupt_on_signals():
            return command(args, env)
    except Interrupted as e:
        print(f"{args.command}: interrupted by signal {e.signum}", file=sys.stderr, flush=True)
        return e.exit_code
    except GpuRunnersError as e:
        _report(args.command, e, env)
        if args.command == "spawn":
            from gpu_runners.step_outputs import write_failure_summary

            write_failure_summary("spawn", str(e), env)
        return e.exit_code
