"""Where the cold start went, end to end: the job's client writes the step summary from the
result the real broker sends, after spawning on the fake cluster over HTTP.

The fake autoscaler adds a node that registers NotReady, turns Ready, and offers its GPU once
the driver is in (`PodScript.node_not_ready_seconds`, `driver_delay`); the broker reads that
node once to split "node ready" from "driver ready". Timestamps have the API server's
one-second resolution, so the split is checked to about a second.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from components.broker import TOKEN_REVIEW_RULES
from gpu_runners import contract
from tests.broker.broker_harness import broker_environ, serve_broker
from tests.client.cli_process import job_step_environ, run_cli
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes, FakeNode, PodScript, Taint
from tests.fakes.oidc_issuer import FakeOidcIssuer
from tests.runtime.fake_wiring import bring_runners_online

#: The fake's new node: Ready 2.5 s after the scale-up is triggered (registered NotReady for
#: the last 1 s of it), its GPU allocatable 1.5 s after that.
SCALE_UP_DELAY, NOT_READY, DRIVER_DELAY = 2.5, 1.0, 1.5
#: Both ends of the node's Ready interval are whole-second timestamps.
RESOLUTION = 1.1
NODE_ROWS = {"Node ready", "Driver ready", "Node ready with GPU driver"}


@contextlib.contextmanager
def job_on_broker(
    make_fake_kube: Callable[..., FakeKubernetes], github: FakeGitHub, issuer: FakeOidcIssuer,
    scratch: Path, **fake_options: Any,
) -> Iterator[tuple[FakeKubernetes, dict[str, str]]]:
    """A fake cluster built with `fake_options`, the broker served on it, and a job step's
    environment calling that broker."""
    kube = make_fake_kube(**fake_options)
    bring_runners_online(kube, github)
    (scratch / "broker").mkdir()
    broker = serve_broker(broker_environ(kube, github, issuer, scratch / "broker"), kube, github,
                          reconcile=False)
    try:
        yield kube, job_step_environ(broker.url, issuer, scratch / "job",
                                     **{contract.ENV_BROKER_AUDIENCE: issuer.audience})
    finally:
        broker.stop()


def spawn_summary(env: dict[str, str]) -> tuple[list[tuple[str, str]], str]:
    """Runs the job's `spawn`; returns the summary table's rows and the command's output."""
    done = run_cli(env, "spawn", "--gpus", "1", "--gpu-type", "nvidia-l4")
    assert done.returncode == 0, done.stderr
    text = Path(env[contract.ENV_STEP_SUMMARY]).read_text()
    rows = re.findall(r"^\| (.+?) \| (.+?) \|$", text, flags=re.MULTILINE)
    return [(key, value) for key, value in rows if key.strip()], done.stdout


def seconds(rows: list[tuple[str, str]], key: str) -> float:
    (value,) = [value for name, value in rows if name == key]
    match = re.match(r"(\d+\.\d) s\b", value)
    assert match is not None, value
    return float(match.group(1))


def test_a_run_on_a_new_node_shows_node_ready_and_driver_ready_as_the_fake_timed_them(
    make_fake_kube: Callable[..., FakeKubernetes], fake_github: FakeGitHub,
    fake_oidc: FakeOidcIssuer, tmp_path: Path,
) -> None:
    script = PodScript.scale_up(scale_up_delay=SCALE_UP_DELAY, node_not_ready_seconds=NOT_READY,
                                driver_delay=DRIVER_DELAY)
    with job_on_broker(make_fake_kube, fake_github, fake_oidc, tmp_path,
                       scheduler=lambda pod: script) as (kube, env):
        rows, _ = spawn_summary(env)

    names = [name for name, _ in rows]
    assert names[names.index("Ready after"):] == [
        "Ready after", "New node", "Scale-up decision", "Node ready", "Driver ready",
        "Image pull", "Runner online"]
    assert dict(rows)["New node"] == "yes, added by the autoscaler"
    node_ready, driver_ready = seconds(rows, "Node ready"), seconds(rows, "Driver ready")
    assert abs(node_ready - SCALE_UP_DELAY) <= RESOLUTION
    assert abs(driver_ready - DRIVER_DELAY) <= RESOLUTION
    # Together they are the interval the broker observed itself, from the scale-up to the
    # binding: its length does not depend on the timestamps' resolution.
    assert abs(node_ready + driver_ready - (SCALE_UP_DELAY + DRIVER_DELAY)) <= 0.5
    phases = sum(seconds(rows, key) for key in ("Scale-up decision", "Node ready",
                                                "Driver ready", "Image pull", "Runner online"))
    assert phases <= seconds(rows, "Ready after")
    (node,) = [n["metadata"]["name"] for n in kube.nodes()
               if n["metadata"]["name"].startswith("gke-fake-gpu-nvidia-l4-")]
    reads = [r.path for r in kube.requests if r.path.startswith("/api/v1/nodes")]
    assert reads == [f"/api/v1/nodes/{node}"]  # one GET, no list or watch


def test_a_run_on_an_existing_node_shows_no_node_rows_and_reads_no_node(
    make_fake_kube: Callable[..., FakeKubernetes], fake_github: FakeGitHub,
    fake_oidc: FakeOidcIssuer, tmp_path: Path,
) -> None:
    gpu_node = FakeNode("gke-gpu-l4-up", {"gpu": "true", contract.GKE_ACCELERATOR_LABEL:
                                          "nvidia-l4"}, gpus=1,
                        taints=(Taint("nvidia.com/gpu", "present"),))
    with job_on_broker(make_fake_kube, fake_github, fake_oidc, tmp_path,
                       nodes=[gpu_node]) as (kube, env):
        rows, _ = spawn_summary(env)

    assert dict(rows)["New node"] == "no, an existing node"
    assert not NODE_ROWS & {name for name, _ in rows}
    assert "Scale-up decision" not in dict(rows)
    assert not any(r.path.startswith("/api/v1/nodes") for r in kube.requests)


def test_a_broker_without_the_node_right_still_spawns_and_shows_the_combined_row(
    make_fake_kube: Callable[..., FakeKubernetes], fake_github: FakeGitHub,
    fake_oidc: FakeOidcIssuer, tmp_path: Path,
) -> None:
    # The ClusterRole before the node right: TokenReviews only.
    script = PodScript.scale_up(scale_up_delay=0.5, driver_delay=0.5)
    with job_on_broker(make_fake_kube, fake_github, fake_oidc, tmp_path,
                       cluster_rules=TOKEN_REVIEW_RULES,
                       scheduler=lambda pod: script) as (kube, env):
        rows, stdout = spawn_summary(env)

    assert kube.forbidden == ["get nodes"]
    kube.forbidden.clear()  # refused on purpose: the fixture fails a test on any other 403
    names = {name for name, _ in rows}
    assert "Node ready with GPU driver" in names
    assert not {"Node ready", "Driver ready"} & names
    assert 0.9 <= seconds(rows, "Node ready with GPU driver") <= 2.0
    assert re.search(r"cannot read node gke-fake-gpu-nvidia-l4-\w+ \(HTTP 403\): the step "
                     r"summary shows its node and driver ready as one", stdout)
