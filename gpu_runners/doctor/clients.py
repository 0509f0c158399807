"""The reads the doctor adds to gpu_runners' Kubernetes and GitHub clients.

Subclasses, so that each call keeps the parent's timeouts, retries and domain errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubernetes.client import AppsV1Api

from gpu_runners.doctor.cluster_facts import (
    DeploymentFact,
    NodeFact,
    QuotaFact,
    deployment_fact,
    node_fact,
    quota_fact,
)
from gpu_runners.github_api import GitHubClient
from gpu_runners.kube import KubeClient


class ClusterClient(KubeClient):
    """KubeClient plus the cluster-wide and apps/v1 reads of the doctor."""

    def list_nodes(self) -> list[NodeFact]:
        """Every node, reduced to what the checks read."""
        listing = self._call("list nodes", self.core.list_node)
        return [node_fact(node) for node in listing.items]

    def read_deployment(self, namespace: str, name: str) -> DeploymentFact | None:
        """The Deployment, or None if it does not exist."""
        apps = AppsV1Api(self.api_client)
        found = self._read(f"get deployments in namespace {namespace}",
                           apps.read_namespaced_deployment, name, namespace)
        return deployment_fact(found) if found is not None else None

    def list_quotas(self, namespace: str) -> list[QuotaFact]:
        """The namespace's ResourceQuotas."""
        listing = self._call(f"list resourcequotas in namespace {namespace}",
                             self.core.list_namespaced_resource_quota, namespace)
        return [quota_fact(quota) for quota in listing.items]

    def read_log(self, namespace: str, pod: str, container: str) -> list[str]:
        """A finished container's log, as lines."""
        text = self._call(f"get pods/log in namespace {namespace}",
                          self.core.read_namespaced_pod_log, pod, namespace,
                          container=container)
        return str(text).splitlines()


@dataclass(frozen=True)
class RepositoryAnswer:
    """GET /repos/{owner}/{repo}: the body, and the token's classic scopes if it has any."""

    body: dict[str, Any]
    oauth_scopes: str | None


class DoctorGitHub(GitHubClient):
    """GitHubClient plus the repository and release reads of the doctor."""

    def repository(self, repository: str) -> RepositoryAnswer:
        """Reads the repository; its answer also carries the token's scopes (classic PATs)."""
        response = self._request("GET", f"/repos/{repository}")
        return RepositoryAnswer(dict(response.body), response.headers.get("x-oauth-scopes"))

    def releases(self, repository: str) -> list[dict[str, Any]]:
        """The repository's newest releases (one page of 100, newest first)."""
        response = self._request("GET", f"/repos/{repository}/releases",
                                 query={"per_page": "100"})
        return list(response.body) if isinstance(response.body, list) else []
