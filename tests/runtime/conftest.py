"""Fixtures of the runtime tests: the product's clients on the fake servers (see fake_wiring)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from components.broker import BROKER_CLUSTER_RULES
from components.runner_plane import SPAWNER_RULES
from gpu_runners.github_api import GitHubClient
from gpu_runners.kube import KubeClient
from gpu_runners.progress import ProgressLog
from tests.fakes.fixtures import enforcing_rbac
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes
from tests.runtime.fake_wiring import (
    bring_runners_online,
    github_client_for,
    kube_client_for,
)


@pytest.fixture
def make_fake_kube(
    make_fake_kube: Callable[..., FakeKubernetes],
) -> Iterator[Callable[..., FakeKubernetes]]:
    """Fake clusters that enforce the rights the broker holds, which the operations here run
    under: its Role in the runner namespace (the spawner rules) and its ClusterRole (a node
    read by name, and TokenReviews): a call they do not allow fails the test."""
    with enforcing_rbac(make_fake_kube, SPAWNER_RULES, "the broker's Role and ClusterRole",
                        cluster_rules=BROKER_CLUSTER_RULES) as make:
        yield make


@pytest.fixture
def kube(fake_kube: FakeKubernetes) -> KubeClient:
    """The product's Kubernetes client, talking to the default fake cluster."""
    return kube_client_for(fake_kube)


@pytest.fixture
def github(fake_github: FakeGitHub) -> GitHubClient:
    """The product's GitHub client for acme/models, talking to the fake GitHub."""
    return github_client_for(fake_github)


@pytest.fixture
def runners_come_online(fake_kube: FakeKubernetes, fake_github: FakeGitHub) -> None:
    """Connects the two fakes: a Running GPU pod makes its runner online."""
    bring_runners_online(fake_kube, fake_github)


@pytest.fixture
def log() -> ProgressLog:
    """A progress log kept in memory (`log.lines`)."""
    return ProgressLog(None)

