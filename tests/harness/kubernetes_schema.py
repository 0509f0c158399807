"""Strict validation of Kubernetes objects against the official OpenAPI-derived JSON schemas.

Uses the schemas bundled with `kubernetes-validate`, in strict mode (an unknown field is an
error, which is how typos in dict-form Pulumi inputs get caught), and reports every error of an
object rather than the first. Validators are built once per kind and cached.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any

import jsonschema
import referencing

#: The Kubernetes minor version objects are validated for: what GKE's REGULAR channel runs.
KUBERNETES_VERSION = "1.34"

_SCHEMAS = resources.files("kubernetes_validate") / "kubernetes-json-schema"


def _schema_dir(version: str) -> Any:
    return _SCHEMAS / f"v{version}.0-local-strict"


@functools.cache
def _registry(version: str) -> referencing.Registry[Any]:
    definitions = json.loads((_schema_dir(version) / "_definitions.json").read_text())
    return referencing.Resource.from_contents(definitions) @ referencing.Registry()


@functools.cache
def _validator(api_version: str, kind: str, version: str) -> jsonschema.Draft202012Validator:
    # rbac.authorization.k8s.io/v1 -> rbac-v1, v1 -> v1: the bundle's file naming.
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = _schema_dir(version) / f"{kind.lower()}-{group_version}.json"
    if not path.is_file():
        raise LookupError(f"no schema for {kind} {api_version} in Kubernetes {version}")
    schema = json.loads(path.read_text())
    return jsonschema.Draft202012Validator(schema, registry=_registry(version))


def strict_errors(manifest: dict[str, Any], version: str = KUBERNETES_VERSION) -> list[str]:
    """Every schema error of one object, as `<path>: <message>` lines (empty when valid)."""
    validator = _validator(manifest["apiVersion"], manifest["kind"], version)
    return [f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in sorted(validator.iter_errors(manifest), key=lambda e: list(e.path))]
