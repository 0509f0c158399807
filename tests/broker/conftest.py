"""Fixtures of the broker tests: the broker over real HTTP on the fakes (see broker_harness)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from components.broker import BROKER_CLUSTER_RULES, BROKER_RULES
from tests.broker.broker_harness import ServedBroker, broker_environ, serve_broker
from tests.fakes.fixtures import enforcing_rbac
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes
from tests.fakes.oidc_issuer import FakeOidcIssuer
from tests.runtime.fake_wiring import bring_runners_online


@pytest.fixture
def make_fake_kube(
    make_fake_kube: Callable[..., FakeKubernetes],
) -> Iterator[Callable[..., FakeKubernetes]]:
    """Fake clusters that enforce the broker's rights: its Role in the runner namespace (the
    spawner rules and its run records) and its ClusterRole (TokenReview create, node get): a
    call outside them is refused with 403 and fails the test."""
    with enforcing_rbac(make_fake_kube, BROKER_RULES, "the broker's Role and ClusterRole",
                        cluster_rules=BROKER_CLUSTER_RULES) as make:
        yield make


@pytest.fixture
def env(fake_kube: FakeKubernetes, fake_github: FakeGitHub, fake_oidc: FakeOidcIssuer,
        tmp_path: Path) -> dict[str, str]:
    """The broker's environment on the fakes (runners come online when their pods run)."""
    bring_runners_online(fake_kube, fake_github)
    return broker_environ(fake_kube, fake_github, fake_oidc, tmp_path)


@pytest.fixture
def make_broker(fake_kube: FakeKubernetes, fake_github: FakeGitHub
                ) -> Iterator[Callable[..., ServedBroker]]:
    """Serves brokers built from an environment; stopped afterwards."""
    served: list[ServedBroker] = []

    def make(environ: dict[str, str], **options: Any) -> ServedBroker:
        options.setdefault("reconcile", False)
        broker = serve_broker(environ, fake_kube, fake_github, **options)
        served.append(broker)
        return broker

    yield make
    for broker in served:
        broker.stop()


@pytest.fixture
def broker(make_broker: Callable[..., ServedBroker], env: dict[str, str]) -> ServedBroker:
    """The broker with the default settings (no reaper loop: tests drive it)."""
    return make_broker(env)
