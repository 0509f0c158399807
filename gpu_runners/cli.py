"""The command line: `python3 -m gpu_runners spawn|delete|list`, a thin client of the broker.

The broker (`gpu_runners.broker`) holds the GitHub credential and the Kubernetes rights; this
command holds neither. It checks its arguments, then asks the broker with the job's GitHub
Actions OIDC token, from which the broker takes the run (`broker_client`). Arguments are checked
before the HTTP client is even imported: a typo costs milliseconds and sends nothing. Failures
print one line (a GitHub annotation inside Actions) and exit with the code the help lists.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from gpu_runners import contract
from gpu_runners.errors import GpuRunnersError, Interrupted, UsageError
from gpu_runners.gpu_pools import check_gpu_request, parse_gpu_pools, parse_gpu_types
from gpu_runners.pod_options import (
    DEFAULT_CPU,
    DEFAULT_MAX_RUNTIME_SECONDS,
    DEFAULT_MEMORY,
    DEFAULT_SHM_SIZE,
    RunnerPodOptions,
)
from gpu_runners.progress import ProgressLog, unstamped
from gpu_runners.quantities import parse_duration_seconds

if TYPE_CHECKING:  # http.client, urllib and the API's dataclasses cost milliseconds: only
    # commands that send pay them, not --help or a refused argument
    from gpu_runners.broker_api import DeleteOutcome, SpawnAsk
    from gpu_runners.broker_client import BrokerClient

EXIT_CODES = """\
exit codes:
  0    success
  1    unexpected error, or an answer of the broker this client does not understand
  2    bad arguments or environment, e.g. no OIDC token (nothing was sent to the broker)
  3    GitHub API error: the job's OIDC token could not be fetched, or the broker's GitHub
       calls failed (token, scope, rate limit)
  4    Kubernetes API error at the broker
  5    spawn: no GPU capacity and no scale-up coming, for every --gpu-type
  6    spawn: the runner image cannot be pulled
  7    spawn: the pod failed or ended before its runner came online, or a delete stopped it
  8    spawn: the runner was not online within --timeout
  9    the broker refused this job's OIDC token or its ask (repository, event, policy)
  10   the broker is unreachable or unavailable
  130  interrupted by SIGINT; spawn asked the broker to remove this run's runner
  143  terminated by SIGTERM; spawn asked the broker to remove this run's runner
"""

BROKER_NOTE = f"""\
Every command asks the runner broker (${contract.ENV_BROKER_URL}, or --broker) with
this job's GitHub Actions OIDC token for the audience ${contract.ENV_BROKER_AUDIENCE}
(default {contract.DEFAULT_BROKER_AUDIENCE}); the job needs `permissions: id-token: write`. The
broker takes the run id and attempt from the token, and the cluster is its own: the options
that named them (run id, run attempt, repository, org, namespace, kubeconfig, context) are
gone, and the broker reaps by itself.
"""

#: Seconds a signalled spawn spends asking the broker to remove its runner: GitHub sends SIGINT,
#: then SIGTERM 7.5 s later, so the removal must be asked for well within that window.
CLEANUP_SECONDS = 5.0
#: Budget of `list`, retries included.
LIST_TIMEOUT_SECONDS = 30.0

Command = Callable[[argparse.Namespace, Mapping[str, str]], int]


class _RemovedOption(argparse.Action):
    """An option of the pre-broker CLI: refused with the reason, so old workflows learn why."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, reason: str,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.reason = reason

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser.error(f"{option_string} is no longer accepted: {self.reason}")


_REMOVED_OPTIONS = {
    "--run-id": "the broker takes the run from the job's OIDC token",
    "--run-attempt": "the broker takes the run attempt from the job's OIDC token",
    "--repository": "the broker serves the repository of the job's OIDC token",
    "--org": "the broker registers runners where the stack says",
    "--namespace": "the broker puts GPU pods in the stack's namespace",
    "--kubeconfig": "only the broker talks to the cluster",
    "--context": "only the broker talks to the cluster",
}


def _client_parser() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("broker")
    group.add_argument("--broker", metavar="URL",
                       help=f"the broker's URL (default: ${contract.ENV_BROKER_URL})")
    for option, reason in _REMOVED_OPTIONS.items():
        parent.add_argument(option, action=_RemovedOption, reason=reason)
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the three commands (and of `reap`, which only says it moved)."""
    client = _client_parser()
    formatting: dict[str, Any] = {
        "epilog": BROKER_NOTE + "\n" + EXIT_CODES,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }
    parser = argparse.ArgumentParser(
        prog="python3 -m gpu_runners",
        description="Per-run GPU runners for GitHub Actions, started by the runner broker.",
        **formatting,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    spawn = commands.add_parser(
        "spawn", parents=[client], **formatting,
        help="start this run's GPU runner and wait until it is online",
        description="Ask the broker to start this run's GPU runner and print its progress until\n"
        "the runner is online; writes label=gpu-<run_id>-<attempt> to $GITHUB_OUTPUT.\n"
        "Durations are whole numbers with s, m or h (a bare number means minutes). The\n"
        "broker applies the stack's policy to what is asked: runtime cap, GPU pools,\n"
        "allowed images, GPU cap.",
    )
    spawn.add_argument("--gpus", type=int, default=1, help="GPUs for the runner (default: 1)")
    spawn.add_argument("--gpu-type", action="append", metavar="TYPE[,TYPE...]",
                       help="GKE accelerator, e.g. nvidia-l4; several are tried in order when "
                       "one has no capacity (default: any GPU pool)")
    spawn.add_argument("--cpu", help=f"CPU (default: {DEFAULT_CPU})")
    spawn.add_argument("--memory", help=f"memory, e.g. 16Gi (default: {DEFAULT_MEMORY})")
    spawn.add_argument("--shm-size",
                       help=f"size of /dev/shm, part of --memory (default: {DEFAULT_SHM_SIZE})")
    spawn.add_argument("--max-runtime", metavar="DURATION",
                       help="the pod is killed after this, e.g. 6h; at most the stack's "
                       "maxRuntimeMinutes (default: that)")
    spawn.add_argument("--timeout", default="20m", metavar="DURATION",
                       help="give up if the runner is not online by then (default: 20m)")
    spawn.add_argument("--scale-up-grace", metavar="DURATION",
                       help="how long an unschedulable pod may wait for the autoscaler to "
                       "start a scale-up (default: the broker's)")
    spawn.add_argument("--image", help="image the job runs in, with the runner injected (e.g. "
                       "a CUDA image); the stack's allowedImages must allow it, and a tag is "
                       "pinned to its digest (default: the stack's runner image)")
    spawn.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                       help="extra pod label (repeatable)")
    spawn.add_argument("--runner-group", help="organisation runner group name or id "
                       "(default: Default)")
    spawn.set_defaults(run=_spawn)

    delete = commands.add_parser(
        "delete", parents=[client], **formatting,
        help="remove this run's pod, secret and runner registration (already gone is fine)",
    )
    delete.add_argument("--timeout", default="2m", metavar="DURATION",
                        help="how long to keep asking; the broker waits up to 60s for a busy "
                        "runner to stop (default: 2m)")
    delete.set_defaults(run=_delete)

    listing = commands.add_parser("list", parents=[client], help="show the GPU runners",
                                  **formatting)
    listing.set_defaults(run=_list)

    reap = commands.add_parser(
        "reap", **formatting,
        help="removed: the broker removes finished, expired and orphaned runners itself",
    )
    reap.set_defaults(run=_reap)
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


def _spawn_ask(args: argparse.Namespace, environ: Mapping[str, str]) -> SpawnAsk:
    """The ask, checked here with the rules the broker applies, so a typo sends nothing.

    Raises:
        UsageError: Naming the option and what is allowed.
    """
    gpu_types = parse_gpu_types(args.gpu_type or [])
    # The base runner may know the GPU pools; without them only the form is checked here.
    check_gpu_request(args.gpus, gpu_types, parse_gpu_pools(environ.get(contract.ENV_GPU_POOLS)))
    max_runtime = (parse_duration_seconds(args.max_runtime, "--max-runtime")
                   if args.max_runtime else None)
    labels = _labels(args.label)
    # The pod's own rules (sizes, /dev/shm within memory, runtime bound, label syntax) as the
    # broker will apply them; namespace and image are the broker's to choose, so placeholders.
    RunnerPodOptions(
        namespace="chosen-by-the-broker", image="chosen-by-the-broker", gpu_count=args.gpus,
        cpu=args.cpu or DEFAULT_CPU, memory=args.memory or DEFAULT_MEMORY,
        shm_size=args.shm_size or DEFAULT_SHM_SIZE,
        max_runtime_seconds=max_runtime or DEFAULT_MAX_RUNTIME_SECONDS, extra_labels=labels,
    )
    if args.runner_group is not None and not args.runner_group.strip():
        raise UsageError("--runner-group is empty; give a runner group name or id")
    from gpu_runners.broker_api import SpawnAsk

    return SpawnAsk(
        gpus=args.gpus,
        gpu_types=gpu_types,
        cpu=args.cpu,
        memory=args.memory,
        shm_size=args.shm_size,
        max_runtime_seconds=max_runtime,
        timeout_seconds=float(parse_duration_seconds(args.timeout, "--timeout")),
        scale_up_grace_seconds=(float(parse_duration_seconds(args.scale_up_grace,
                                                             "--scale-up-grace"))
                                if args.scale_up_grace else None),
        image=args.image or None,
        labels=labels,
        runner_group=args.runner_group.strip() if args.runner_group else None,
    )


def _client(args: argparse.Namespace, environ: Mapping[str, str]) -> BrokerClient:
    """The broker client; raises UsageError (nothing sent) without a broker URL or token."""
    from gpu_runners.broker_client import BrokerClient, BrokerEndpoint, JobTokenSource

    endpoint = BrokerEndpoint.parse(args.broker or environ.get(contract.ENV_BROKER_URL) or "")
    return BrokerClient(endpoint, JobTokenSource.from_environ(environ))


def _spawn(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    ask = _spawn_ask(args, environ)
    client = _client(args, environ)
    log = ProgressLog(sys.stdout)
    try:
        result = client.spawn(ask, on_progress=lambda line: log.line(unstamped(line)))
    except Interrupted as e:
        _remove_after_signal(client, log, e.signum)
        raise
    from gpu_runners.step_outputs import write_preemption_notes, write_spawn_outputs

    write_spawn_outputs(result, environ)
    write_preemption_notes(result.preemptions, {})  # the notices; the table has its rows
    log.line(f"ready: runs-on: {result.label}")
    return 0


def _remove_after_signal(client: BrokerClient, log: ProgressLog, signum: int) -> None:
    """Asks the broker to remove this run's runner, within CLEANUP_SECONDS; never raises.

    The broker does not stop a spawn when its stream drops (a dropped stream is retried), so a
    cancelled setup must say so, or its GPU pod would wait for a job that never comes.
    """
    log.line(f"signal {signum}: asking the broker to remove this run's runner")
    try:
        outcome = client.delete(timeout_seconds=CLEANUP_SECONDS)
    except GpuRunnersError as e:
        log.line(f"cleanup: could not remove this run's runner ({e}); the broker's reaper will")
        return
    removed = _removed(outcome)
    log.line(f"removed {', '.join(removed)} after: signal {signum}" if removed
             else f"nothing to remove after: signal {signum}")


def _removed(outcome: DeleteOutcome) -> list[str]:
    return ([f"pod {name}" for name in outcome.pods]
            + [f"secret {name}" for name in outcome.secrets]
            + [f"runner registration {name}" for name in outcome.registrations])


def _run_label(environ: Mapping[str, str]) -> str:
    """This run's runner label from the job's environment, for messages only."""
    run_id = environ.get(contract.ENV_RUN_ID, "").strip()
    attempt = environ.get(contract.ENV_RUN_ATTEMPT, "").strip() or "1"
    return f"{contract.GPU_RUNNER_PREFIX}{run_id}-{attempt}" if run_id else "this run's runner"


def _delete(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    timeout = parse_duration_seconds(args.timeout, "--timeout")
    client = _client(args, environ)
    log = ProgressLog(sys.stdout)
    outcome = client.delete(timeout_seconds=timeout)
    for line in _removed(outcome):
        log.line(f"deleted {line}")
    if not _removed(outcome):
        log.line(f"nothing left of {_run_label(environ)}: pod, secret and registration are gone")
    if outcome.recoveries:
        from gpu_runners.step_outputs import write_preemption_notes

        write_preemption_notes(outcome.recoveries, environ)
    return 0


def _list(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    client = _client(args, environ)
    views = client.list_runners(timeout_seconds=LIST_TIMEOUT_SECONDS)

    from gpu_runners.runner_table import format_table, row_of_view

    if not views:
        print("no GPU runners for this repository")
    else:
        oldest_first = sorted(views, key=lambda view: -view.age_seconds)
        print(format_table([row_of_view(view) for view in oldest_first]))
    return 0


def _reap(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    raise UsageError("reap is no longer a command of this client: the broker removes finished, "
                     "expired and orphaned GPU runners itself; nothing was done")


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
        # A workflow command: Actions shows it as an error annotation on the run. Its data
        # escapes `%` (as @actions/core does), or "100%0A" would show as a line break.
        print(f"::error title=gpu_runners {command}::{reason.replace('%', '%25')}",
              file=sys.stderr, flush=True)
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
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "reap":  # reap's old options only get its notice
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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
