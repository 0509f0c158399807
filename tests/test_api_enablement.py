"""On a new project every GCP resource waits for the API it calls.

Mocks answer at once; a real project answers `SERVICE_DISABLED` to a call made before its API
is enabled, and the engine runs resources in parallel unless one depends on another. So each
resource's dependencies, followed transitively as the engine orders them, must reach the
`gcp.projects.Service` that enables its API.
"""

from __future__ import annotations

import pytest

from tests.harness.mock_stack import ProgramRun, RegisteredResource, run_program

SERVICE = "gcp:projects/service:Service"
#: The API each GCP resource type of the program calls (Google's REST endpoints).
API_OF_TYPE = {
    "gcp:container/cluster:Cluster": "container.googleapis.com",
    "gcp:container/nodePool:NodePool": "container.googleapis.com",
    "gcp:serviceaccount/account:Account": "iam.googleapis.com",
    "gcp:serviceaccount/key:Key": "iam.googleapis.com",
    "gcp:serviceaccount/iAMMember:IAMMember": "iam.googleapis.com",
    "gcp:iam/workloadIdentityPool:WorkloadIdentityPool": "iam.googleapis.com",
    "gcp:iam/workloadIdentityPoolProvider:WorkloadIdentityPoolProvider": "iam.googleapis.com",
    "gcp:projects/iAMMember:IAMMember": "cloudresourcemanager.googleapis.com",
    "gcp:artifactregistry/repository:Repository": "artifactregistry.googleapis.com",
    "gcp:artifactregistry/repositoryIamMember:RepositoryIamMember":
        "artifactregistry.googleapis.com",
    "gcp:secretmanager/secretIamMember:SecretIamMember": "secretmanager.googleapis.com",
}
#: Enabled in every new project (Google's default services), so nothing enables them.
ON_BY_DEFAULT = {"gcp:storage/bucketIAMMember:BucketIAMMember"}


@pytest.fixture(scope="module")
def run() -> ProgramRun:
    # Seed compatibility and a DVC bucket add the key and the bucket binding; a private mirror
    # upstream the Secret Manager binding.
    return run_program("dev", {"seedCompatibility": True, "dvcBucket": "acme-dvc",
                               "imageMirrorUpstreams": ["ghcr.io", "nvcr.io"],
                               "imageMirrorCredentials": {"nvcr.io": {
                                   "username": "$oauthtoken",
                                   "passwordSecretVersion":
                                       "projects/acme-ml-ci/secrets/ngc-key/versions/1"}}})


def upstream(run: ProgramRun, resource: RegisteredResource) -> list[RegisteredResource]:
    """Everything the engine finishes before `resource` starts, through its dependencies."""
    by_urn = {r.urn: r for r in run.resources}
    seen: dict[str, RegisteredResource] = {}
    pending = list(resource.dependencies)
    while pending:
        urn = pending.pop()
        if urn in seen or urn not in by_urn:
            continue
        seen[urn] = by_urn[urn]
        pending.extend(by_urn[urn].dependencies)
    return list(seen.values())


def test_every_gcp_resource_type_of_the_program_is_mapped_to_its_api(run: ProgramRun) -> None:
    types = {r.typ for r in run.resources
             if r.custom and r.typ.startswith("gcp:") and r.typ != SERVICE}
    assert types - set(API_OF_TYPE) - ON_BY_DEFAULT == set()


def test_every_gcp_resource_waits_for_its_api(run: ProgramRun) -> None:
    checked = 0
    for resource in run.resources:
        api = API_OF_TYPE.get(resource.typ)
        if api is None:
            continue
        enabling = [r for r in upstream(run, resource)
                    if r.typ == SERVICE and r.inputs["service"] == api]
        assert enabling, f"{resource.typ} {resource.name} does not wait for {api}"
        checked += 1
    assert checked >= 10


def test_api_enablement_survives_destroy(run: ProgramRun) -> None:
    services = run.of_type(SERVICE)
    assert {s.inputs["service"] for s in services} >= set(API_OF_TYPE.values())
    assert all(s.inputs["disableOnDestroy"] is False for s in services)
