"""Pytest fixtures serving the fakes; load them with `pytest_plugins = ["tests.fakes.fixtures"]`."""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes
from tests.fakes.oci_registry import FakeOciRegistry
from tests.fakes.oidc_issuer import FakeOidcIssuer


@pytest.fixture
def fake_github() -> Iterator[FakeGitHub]:
    """A started FakeGitHub for repository acme/models (token "ghp_fake"), stopped afterwards."""
    with FakeGitHub() as github:
        yield github


@pytest.fixture
def fake_oidc() -> Iterator[FakeOidcIssuer]:
    """A started FakeOidcIssuer for acme/models (ids "74"/"65", run 123 attempt 1, push to
    refs/heads/main), minting tokens for the broker's default audience; stopped afterwards."""
    with FakeOidcIssuer() as issuer:
        yield issuer


@pytest.fixture
def make_fake_kube(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., FakeKubernetes]]:
    """Starts FakeKubernetes servers built with the given keyword arguments.

    Each gets a kubeconfig at `fake.kubeconfig_path` (under tmp_path), and KUBECONFIG names the
    last one, for the `gpu_runners` CLI run as a subprocess. All are stopped afterwards; a test
    fails if a simulation step or an `on_pod_running` callback raised (`fake.errors`).
    """
    started: list[FakeKubernetes] = []

    def make(**options: Any) -> FakeKubernetes:
        kube = FakeKubernetes(**options).start()
        started.append(kube)
        kube.write_kubeconfig(tmp_path / f"kubeconfig-{len(started)}")
        monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig_path))
        return kube

    yield make
    for kube in started:
        kube.stop()
    errors = [error for kube in started for error in kube.errors]
    assert not errors, "the fake Kubernetes API failed:\n" + "\n".join(errors)


@pytest.fixture
def fake_kube(make_fake_kube: Callable[..., FakeKubernetes]) -> FakeKubernetes:
    """A started FakeKubernetes with its defaults: namespace github-runners, three CPU nodes
    (gpu=false), one NVIDIA L4 pool autoscaled from zero, Pod Security restricted."""
    return make_fake_kube()


@pytest.fixture
def fake_registry() -> Iterator[FakeOciRegistry]:
    """A started FakeOciRegistry (token service, manifests, blobs), stopped afterwards."""
    with FakeOciRegistry() as registry:
        yield registry


@contextlib.contextmanager
def enforcing_rbac(
    make_fake_kube: Callable[..., FakeKubernetes], rules: Sequence[Any], role: str, *,
    cluster_rules: Sequence[Any] = (),
) -> Iterator[Callable[..., FakeKubernetes]]:
    """Wraps `make_fake_kube` so that its clusters enforce `rules` (a Role's) and
    `cluster_rules` (a ClusterRole's) unless a test gives others; on exit, a call outside them
    (a 403 the fake recorded) fails the test, naming `role`."""
    started: list[FakeKubernetes] = []

    def make(**options: Any) -> FakeKubernetes:
        options.setdefault("rbac_rules", rules)
        options.setdefault("cluster_rules", cluster_rules)
        fake = make_fake_kube(**options)
        started.append(fake)
        return fake

    yield make
    forbidden = [request for fake in started for request in fake.forbidden]
    assert forbidden == [], f"calls outside {role}: {forbidden}"
