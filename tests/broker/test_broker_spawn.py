"""Smoke."""
from tests.broker.broker_harness import ServedBroker, spawn, delete
from tests.fakes.oidc_issuer import FakeOidcIssuer
from tests.fakes.kube_api import FakeKubernetes
from tests.fakes.github_api import FakeGitHub


def test_smoke(broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes, fake_github: FakeGitHub) -> None:
    answer = spawn(broker.url, fake_oidc.mint())
    print(answer)
    assert answer.last.event == "ready"
    print(delete(broker.url, fake_oidc.mint()))
    assert fake_kube.pods() == []
