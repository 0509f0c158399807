"""The engine's default-provider rule, applied to everything the program registers or invokes.

Mocks never create default providers, so a resource that would need one passes every other
test and fails only in a real `pulumi up`. The Pulumi engine (pkg/resource/deploy,
`defaultProviders.shouldDenyRequest`) refuses a default provider for a package when
`pulumi:disable-default-providers` lists `*` or the package's name; it exempts only the package
`pulumi` (provider resources themselves). A dynamic resource's package is `pulumi-python`.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.harness.mock_stack import PROJECT_FILE, ProgramRun, run_program

#: Packages that may run on their default provider: the dynamic provider host takes no
#: configuration, so its default provider cannot pick up anything ambient.
DEFAULT_PROVIDER_ALLOWED = {"pulumi-python"}

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dev": ("dev", {}),
    "prod": ("prod", {}),
    "seed compatibility": ("dev", {"seedCompatibility": True, "commitExampleWorkflow": True}),
    "existing cluster": ("dev", {"clusterMode": "existing", "kubeconfigContext": "onprem",
                                 "gpuQuota": 2}),
    "public repository": ("dev", {"repositoryPrivate": False}),
    "mirrors with a private upstream": ("dev", {
        "imageMirrorUpstreams": ["ghcr.io", "docker.io", "nvcr.io"],
        "imageMirrorCredentials": {"nvcr.io": {
            "username": "$oauthtoken",
            "passwordSecretVersion": "projects/acme-ml-ci/secrets/ngc-key/versions/1"}}}),
}


def disabled_default_providers() -> list[str]:
    config = yaml.safe_load(PROJECT_FILE.read_text())["config"]
    value = config["pulumi:disable-default-providers"]["value"]
    assert isinstance(value, list)
    return [str(entry).strip() for entry in value]


def engine_denies_default_provider(package: str, disabled: list[str]) -> bool:
    """The engine's `shouldDenyRequest`: `pulumi` always passes; `*` or the name is refused."""
    if package == "pulumi":
        return False
    return any(entry in ("*", package) for entry in disabled)


def package_of(token: str) -> str:
    """The package of a type or function token (`gcp:container/cluster:Cluster` -> gcp)."""
    return token.split(":", 1)[0]


@pytest.fixture(scope="module", params=sorted(VARIANTS), ids=str)
def run(request: pytest.FixtureRequest) -> ProgramRun:
    stack, overrides = VARIANTS[request.param]
    return run_program(stack, overrides)


def test_the_rule_refuses_what_the_engine_refuses() -> None:
    assert engine_denies_default_provider("pulumi-python", ["*"])
    assert engine_denies_default_provider("gcp", ["gcp"])
    assert not engine_denies_default_provider("pulumi", ["*"])
    assert not engine_denies_default_provider("pulumi-python", ["gcp", "kubernetes"])


def test_every_resource_gets_a_provider_the_engine_allows(run: ProgramRun) -> None:
    disabled = disabled_default_providers()
    refused = [f"{r.typ} {r.name}" for r in run.resources
               if r.custom and not r.provider
               and engine_denies_default_provider(package_of(r.typ), disabled)]
    assert refused == []


def test_every_invoke_gets_a_provider_the_engine_allows(run: ProgramRun) -> None:
    disabled = disabled_default_providers()
    refused = [call.token for call in run.invokes
               if not call.provider
               and engine_denies_default_provider(package_of(call.token), disabled)]
    assert refused == []


def test_only_configuration_free_packages_may_use_a_default_provider(run: ProgramRun) -> None:
    # Every package with configuration (credentials, project, kubeconfig) stays on the deny
    # list, so a resource added without its explicit provider fails the update instead of
    # acting on whatever the operator's environment holds.
    disabled = disabled_default_providers()
    assert "*" not in disabled, "'*' also refuses the dynamic provider the program needs"
    packages = {package_of(r.typ) for r in run.resources if r.custom}
    packages |= {package_of(call.token) for call in run.invokes}
    packages.discard("pulumi")
    assert packages - DEFAULT_PROVIDER_ALLOWED <= set(disabled)
    defaulted = {package_of(r.typ) for r in run.resources if r.custom and not r.provider}
    assert defaulted - {"pulumi"} <= DEFAULT_PROVIDER_ALLOWED  # provider resources have none
