"""The CI identity: keyless GitHub -> Google Cloud login for one repository, with its roles."""

from __future__ import annotations

import re
from typing import Any

import pulumi
import pulumi_gcp as gcp
import pytest

from components.ci_identity import CiIdentity, CiIdentityArgs, account_id_for
from tests.test_repository import Declared, declare

PROJECT = "acme-ml-ci"
POOL = "projects/123456789012/locations/global/workloadIdentityPools/github-actions"
EMAIL = f"gpu-runners-dev-github-ci@{PROJECT}.iam.gserviceaccount.com"
#: GitHub's numeric ids of Acme-ML/Vision-Models and of Acme-ML, as the OIDC claims carry them.
REPOSITORY_ID, OWNER_ID = "715823406", "129458320"

SERVICE = "gcp:projects/service:Service"
POOL_TYPE = "gcp:iam/workloadIdentityPool:WorkloadIdentityPool"
PROVIDER_TYPE = "gcp:iam/workloadIdentityPoolProvider:WorkloadIdentityPoolProvider"
PROJECT_MEMBER = "gcp:projects/iAMMember:IAMMember"
BUCKET_MEMBER = "gcp:storage/bucketIAMMember:BucketIAMMember"
ACCOUNT_MEMBER = "gcp:serviceaccount/iAMMember:IAMMember"
KEY = "gcp:serviceaccount/key:Key"
# GCP's rule for service account ids.
ACCOUNT_ID = re.compile(r"^[a-z](?:[-a-z0-9]{4,28}[a-z0-9])$")


def identity_args(**overrides: Any) -> CiIdentityArgs:
    values: dict[str, Any] = {
        "project": PROJECT, "github_owner": "Acme-ML", "github_repository": "Vision-Models",
        "account_prefix": "gpu-runners-dev",
        "repository_id": pulumi.Output.from_input(REPOSITORY_ID),
        "repository_owner_id": OWNER_ID,
        "project_roles": ["roles/container.clusterViewer"],
    }
    return CiIdentityArgs(**{**values, **overrides})


def declare_identity(**overrides: Any) -> Declared:
    def build() -> dict[str, Any]:
        ci = CiIdentity("ci", identity_args(**overrides), opts=pulumi.ResourceOptions(
            providers=[gcp.Provider("gcp", project=PROJECT)]))
        return {"provider": ci.workload_identity_provider, "email": ci.service_account_email,
                "key": ci.service_account_key}
    return declare(build)


@pytest.fixture(scope="module")
def keyless() -> Declared:
    return declare_identity()


def test_oidc_provider_accepts_only_tokens_of_the_repositorys_and_owners_numeric_ids(
        keyless: Declared) -> None:
    provider = keyless.one(PROVIDER_TYPE).inputs
    # Ids, not names: a repository deleted and re-created under the same name (by anyone, in
    # an owner account of the same name) gets new ids and no access.
    assert provider["attributeCondition"] == (
        f'assertion.repository_id == "{REPOSITORY_ID}" && '
        f'assertion.repository_owner_id == "{OWNER_ID}"')
    assert "Vision-Models" not in provider["attributeCondition"]
    assert provider["attributeMapping"]["attribute.repository_id"] == "assertion.repository_id"
    assert provider["attributeMapping"]["attribute.repository_owner_id"] == (
        "assertion.repository_owner_id")
    assert provider["attributeMapping"]["google.subject"] == "assertion.sub"
    assert provider["oidc"] == {"issuerUri": "https://token.actions.githubusercontent.com"}
    assert provider["workloadIdentityPoolId"] == "github-actions"
    assert provider["workloadIdentityPoolProviderId"] == "github"
    assert keyless.one(POOL_TYPE).inputs["workloadIdentityPoolId"] == "github-actions"


def test_only_the_repositorys_tokens_may_impersonate_the_ci_account(keyless: Declared) -> None:
    binding = keyless.one(ACCOUNT_MEMBER).inputs
    assert binding == {
        "serviceAccountId": f"projects/{PROJECT}/serviceAccounts/{EMAIL}",
        "role": "roles/iam.workloadIdentityUser",
        "member": f"principalSet://iam.googleapis.com/{POOL}/attribute.repository_id/"
                  f"{REPOSITORY_ID}",
    }


@pytest.mark.parametrize("field", ["repository_id", "repository_owner_id"])
def test_an_id_that_is_not_decimal_digits_is_refused(field: str) -> None:
    # It would be pasted into the CEL condition: `1" || true || "` must never get there.
    with pytest.raises(ValueError, match=f"CiIdentityArgs.{field} = "):
        declare_identity(**{field: '1" || true || "'})


def test_ci_account_gets_exactly_the_configured_project_roles() -> None:
    declared = declare_identity(project_roles=["roles/container.clusterViewer",
                                               "roles/artifactregistry.reader",
                                               "roles/container.clusterViewer"])
    # Registered concurrently, so in no fixed order; the duplicate is granted once.
    grants = sorted((m.inputs for m in declared.of_type(PROJECT_MEMBER)),
                    key=lambda grant: grant["role"])
    assert grants == [
        {"project": PROJECT, "role": "roles/artifactregistry.reader",
         "member": f"serviceAccount:{EMAIL}"},
        {"project": PROJECT, "role": "roles/container.clusterViewer",
         "member": f"serviceAccount:{EMAIL}"},
    ]
    assert declared.of_type(BUCKET_MEMBER) == []


def test_dvc_bucket_access_is_object_use_on_that_bucket_only() -> None:
    declared = declare_identity(dvc_bucket="acme-dvc-remote")
    assert declared.one(BUCKET_MEMBER).inputs == {
        "bucket": "acme-dvc-remote",
        "role": "roles/storage.objectUser",
        "member": f"serviceAccount:{EMAIL}",
    }
    # Nothing project-wide beyond the configured roles.
    assert [m.inputs["role"] for m in declared.of_type(PROJECT_MEMBER)] == [
        "roles/container.clusterViewer"]


def test_no_key_without_seed_compatibility(keyless: Declared) -> None:
    assert keyless.of_type(KEY) == []
    assert keyless.outputs["key"] is None


def test_seed_compatibility_key_is_the_decoded_json_credentials_as_a_secret() -> None:
    declared = declare_identity(create_key=True)
    assert declared.one(KEY).inputs == {
        "serviceAccountId": f"projects/{PROJECT}/serviceAccounts/{EMAIL}"}
    assert declared.outputs["key"] == '{"type": "service_account"}'
    assert "key" in declared.secret_outputs


def test_outputs_name_the_provider_and_the_account(keyless: Declared) -> None:
    assert keyless.outputs["provider"] == f"{POOL}/providers/github"
    assert keyless.outputs["email"] == EMAIL
    assert not keyless.secret_outputs


def test_federation_apis_are_enabled_first_and_left_on_at_destroy(keyless: Declared) -> None:
    services = keyless.of_type(SERVICE)
    assert sorted(s.inputs["service"] for s in services) == [
        "cloudresourcemanager.googleapis.com", "iam.googleapis.com",
        "iamcredentials.googleapis.com", "sts.googleapis.com"]
    assert all(s.inputs["disableOnDestroy"] is False for s in services)
    assert set(keyless.one(POOL_TYPE).dependencies) == {s.urn for s in services}


def test_every_gcp_resource_goes_through_the_explicit_provider(keyless: Declared) -> None:
    gcp_resources = [r for r in keyless.resources if r.custom and r.typ.startswith("gcp:")]
    assert len(gcp_resources) == 9  # 4 APIs, pool, provider, account, 1 role, impersonation
    for resource in gcp_resources:
        assert "$pulumi:providers:gcp::gcp::" in resource.provider, resource.name
        assert resource.inputs.get("project", PROJECT) == PROJECT


@pytest.mark.parametrize("role", ["roles/owner", "roles/editor", "roles/viewer"])
def test_basic_roles_are_refused(role: str) -> None:
    with pytest.raises(ValueError, match=f"project_roles has {role}: basic roles"):
        CiIdentity("ci", identity_args(project_roles=["roles/container.clusterViewer", role]))


@pytest.mark.parametrize(("prefix", "expected"), [
    ("gpu-runners-dev", "gpu-runners-dev-github-ci"),
    ("a", "a-github-ci"),
    # A 40-character cluster name is cut to GCP's 30 characters, without a trailing '-'.
    ("ml-training-cluster-for-vision-team-prod", "ml-training-cluster-github-ci"),
])
def test_account_id_fits_gcp_rules(prefix: str, expected: str) -> None:
    assert account_id_for(prefix) == expected
    assert ACCOUNT_ID.match(expected)


def test_account_prefix_must_start_with_a_letter() -> None:
    with pytest.raises(ValueError, match="account_prefix = '9-runners'"):
        account_id_for("9-runners")
