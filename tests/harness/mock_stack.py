"""Runs this Pulumi program for a stack under Pulumi mocks: no CLI, no cloud, no credentials.

It does what the Pulumi CLI does before a program starts (fills `Pulumi.yaml` defaults into the
stack's config, checks declared types, passes secrets as secrets) and then runs `__main__.py`
against mocks that record every resource with its inputs, provider and parent, and answer
with the computed outputs the program reads (endpoints, emails, digests), so nothing the
program derives is silently `None`.
"""

from __future__ import annotations

import json
import logging
import runpy
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from google.protobuf import json_format
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc
from pulumi.runtime import stack as pulumi_stack
from pulumi.runtime.settings import get_root_resource

REPO_ROOT = Path(__file__).resolve().parents[2]
PROJECT_FILE = REPO_ROOT / "Pulumi.yaml"
PROGRAM = REPO_ROOT / "__main__.py"

#: Values for the stack files' CHANGE_ME placeholders and the secrets no stack file holds:
#: what an operator would set before `pulumi up`.
FILLED_PLACEHOLDERS: Mapping[str, str] = {
    "gcpProject": "acme-ml-ci",
    "githubOwner": "Acme-ML",
    "githubRepository": "Vision-Models",
}
TEST_SECRETS: Mapping[str, str] = {
    "githubToken": "ghp_admin_token_for_pulumi_0123456789",
    "runnerPat": "ghp_runner_registration_pat_9876543210",
    "imagePullToken": "ghp_read_packages_only_5555555555",
}
FAKE_DIGEST = "sha256:" + "ab" * 32
#: The numeric ids GitHub answers for the test repository and its owner (an organisation).
REPOSITORY_ID = 715823406
OWNER_ID = 129458320


def project_declarations() -> dict[str, dict[str, Any]]:
    """The `config:` declarations of Pulumi.yaml, keyed by project key (without namespace)."""
    project = yaml.safe_load(PROJECT_FILE.read_text())
    return {key: decl for key, decl in project["config"].items()
            if ":" not in key and isinstance(decl, dict) and "type" in decl}


def _check_declared_type(key: str, decl: Mapping[str, Any], value: Any) -> None:
    # The CLI refuses a stack whose value does not match the declared type; so does this.
    expected = {"string": str, "integer": int, "boolean": bool, "array": list}[decl["type"]]
    if isinstance(value, bool) and expected is int or not isinstance(value, expected):
        raise TypeError(f"Pulumi.yaml declares {key} as {decl['type']}, the stack has {value!r}")


def _wire(value: Any) -> str:
    # Config reaches the program as strings; structured values as JSON, as the CLI sends them.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def stack_settings(stack: str) -> dict[str, Any]:
    """The project keys of `Pulumi.<stack>.yaml`, without the project prefix."""
    project = yaml.safe_load(PROJECT_FILE.read_text())["name"]
    data = yaml.safe_load((REPO_ROOT / f"Pulumi.{stack}.yaml").read_text()) or {}
    return {key.split(":", 1)[1]: value for key, value in (data.get("config") or {}).items()
            if key.startswith(f"{project}:")}


def effective_config(stack: str, overrides: Mapping[str, Any] | None = None, *,
                     fill_placeholders: bool = True,
                     secrets: Mapping[str, Any] | None = None) -> tuple[dict[str, str], list[str]]:
    """The config the CLI would hand the program: defaults, stack values, overrides, secrets.

    Returns:
        The namespaced config map (strings) and the namespaced keys that are secret.
    """
    project = yaml.safe_load(PROJECT_FILE.read_text())["name"]
    declarations = project_declarations()
    values: dict[str, Any] = {k: d["default"] for k, d in declarations.items() if "default" in d}
    values.update(stack_settings(stack))
    if fill_placeholders:
        values.update({k: v for k, v in FILLED_PLACEHOLDERS.items()
                       if values.get(k) == "CHANGE_ME"})
    values.update(overrides or {})
    secret_values = dict(TEST_SECRETS if secrets is None else secrets)
    for key, value in values.items():
        if key in declarations and value is not None:
            _check_declared_type(key, declarations[key], value)
    config = {f"{project}:{k}": _wire(v) for k, v in values.items() if v is not None}
    config.update({f"{project}:{k}": _wire(v) for k, v in secret_values.items()})
    return config, [f"{project}:{k}" for k in secret_values]


@dataclass
class RegisteredResource:
    """One resource the program registered, as the engine would have received it."""

    typ: str
    name: str
    urn: str
    custom: bool
    provider: str
    parent: str
    inputs: dict[str, Any]  # wire (camelCase) names, secrets unwrapped
    secret_paths: set[str] = field(default_factory=set)  # dotted input paths that were secret
    outputs: dict[str, Any] = field(default_factory=dict)
    dependencies: list[str] = field(default_factory=list)  # URNs of explicit dependencies
    ignore_changes: list[str] = field(default_factory=list)
    additional_secret_outputs: list[str] = field(default_factory=list)
    #: The former identities the resource answers to, e.g. {"type": "<old type token>"}.
    aliases: list[dict[str, Any]] = field(default_factory=list)
    retain_on_delete: bool = False

    def is_secret(self, path: str) -> bool:
        """Whether the input at `path` (dotted, wire names) or one of its parents is secret."""
        parts = path.split(".")
        return any(".".join(parts[:i]) in self.secret_paths for i in range(1, len(parts) + 1))

    def manifest(self, *, redact_secrets: bool = False) -> dict[str, Any]:
        """The Kubernetes object this resource applies, as the API server would receive it."""
        if not self.typ.startswith("kubernetes:"):
            raise TypeError(f"{self.typ} is not a Kubernetes object")
        body = _integral_floats_to_int(
            _redacted(self.inputs, self.secret_paths) if redact_secrets else self.inputs)
        metadata = {**body.get("metadata", {}), "name": self.outputs["metadata"]["name"]}
        return {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": metadata,
                **{k: v for k, v in body.items() if k not in {"apiVersion", "kind", "metadata"}}}


def _integral_floats_to_int(value: Any) -> Any:
    # The mock protocol carries every number as a float; manifests want replicas: 1, not 1.0.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_floats_to_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_floats_to_int(v) for v in value]
    return value


def _redacted(value: Any, secret_paths: set[str], path: str = "") -> Any:
    if path in secret_paths:
        return "<secret>" if not isinstance(value, dict) else {k: "<secret>" for k in value}
    if isinstance(value, dict):
        return {k: _redacted(v, secret_paths, f"{path}.{k}" if path else k)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v, secret_paths, f"{path}.{i}" if path else str(i))
                for i, v in enumerate(value)]
    return value


def unwrap_secrets(value: Any, path: str = "", found: set[str] | None = None) -> Any:
    """Strip the engine's secret envelopes from a mock input, noting where each one was."""
    found = found if found is not None else set()
    if isinstance(value, dict):
        if value.get(rpc._special_sig_key) == rpc._special_secret_sig:
            found.add(path)
            return unwrap_secrets(value.get("value"), path, found)
        return {k: unwrap_secrets(v, f"{path}.{k}" if path else k, found) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap_secrets(v, f"{path}.{i}" if path else str(i), found)
                for i, v in enumerate(value)]
    return value


def _computed_outputs(typ: str, name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """What the real providers compute and the program reads."""
    if typ == "gcp:container/cluster:Cluster":
        return {"endpoint": "203.0.113.10",
                "masterAuth": {"clusterCaCertificate": "LS0tLS1CRUdJTi1GQUtFLUNBLS0tLS0="},
                "id": f"projects/{inputs.get('project')}/locations/{inputs.get('location')}"
                      f"/clusters/{inputs.get('name', name)}"}
    if typ == "gcp:serviceaccount/account:Account":
        email = f"{inputs['accountId']}@{inputs.get('project')}.iam.gserviceaccount.com"
        return {"email": email, "name": f"projects/{inputs.get('project')}/serviceAccounts/{email}",
                "member": f"serviceAccount:{email}"}
    if typ == "gcp:iam/workloadIdentityPool:WorkloadIdentityPool":
        return {"name": f"projects/123456789012/locations/global/workloadIdentityPools/"
                        f"{inputs['workloadIdentityPoolId']}"}
    if typ == "gcp:iam/workloadIdentityPoolProvider:WorkloadIdentityPoolProvider":
        return {"name": f"projects/123456789012/locations/global/workloadIdentityPools/"
                        f"{inputs['workloadIdentityPoolId']}/providers/"
                        f"{inputs['workloadIdentityPoolProviderId']}"}
    if typ == "gcp:serviceaccount/key:Key":
        return {"privateKey": "eyJ0eXBlIjogInNlcnZpY2VfYWNjb3VudCJ9"}
    if typ == "docker-build:index:Image":
        tags = inputs.get("tags") or [f"registry.invalid/{name}:latest"]
        repository = tags[0].rsplit(":", 1)[0]
        return {"ref": f"{repository}@{FAKE_DIGEST}", "digest": FAKE_DIGEST}
    if typ.startswith("kubernetes:") and not typ.startswith("pulumi:providers"):
        metadata = dict(inputs.get("metadata") or {})
        metadata.setdefault("name", f"{name}-5a1f2e")  # pulumi-kubernetes auto-naming
        metadata.setdefault("uid", f"uid-{name}")
        return {"metadata": metadata}
    return {}


class InfraMocks(pulumi.runtime.Mocks):
    """Records every registration; answers with computed outputs and invoke results."""

    def __init__(self) -> None:
        self.resources: list[RegisteredResource] = []
        self.invokes: list[pulumi.runtime.MockCallArgs] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        secret_paths: set[str] = set()
        inputs = unwrap_secrets(dict(args.inputs), "", secret_paths)
        outputs = {**inputs, **_computed_outputs(args.typ, args.name, inputs)}
        if "name" not in outputs and args.typ.startswith("gcp:"):
            outputs["name"] = args.name
        self.resources.append(RegisteredResource(
            typ=args.typ, name=args.name, urn="", custom=bool(args.custom),
            provider=args.provider or "", parent="", inputs=inputs,
            secret_paths=secret_paths, outputs=outputs))
        return f"{args.name}_id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs
             ) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        # The engine's answer carries a list of check failures (the mock monitor iterates it,
        # so it is [] rather than None).
        self.invokes.append(args)
        if args.token == "gcp:organizations/getProject:getProject":
            return {"number": "123456789012", "projectId": args.args.get("projectId", "p")}, []
        if args.token == "github:index/getRepository:getRepository":
            # As the provider answers: the repository's numeric id is a number, the rest names.
            owner, name = args.args["fullName"].split("/")
            return {"id": name, "name": name, "fullName": f"{owner}/{name}",
                    "repoId": REPOSITORY_ID, "nodeId": "R_kgDOKqpyLg", "private": True,
                    "defaultBranch": "main", "visibility": "private"}, []
        if args.token == "github:index/getUser:getUser":
            # GET /users/{name} answers for an organisation too; the data source's id is the
            # account's numeric id, as a string.
            return {"id": str(OWNER_ID), "login": args.args["username"],
                    "nodeId": "O_kgDOB7dNkA", "name": args.args["username"]}, []
        # An invoke the program makes must be answered here, or its result would be silently
        # empty in every test.
        raise LookupError(f"no mock answer for invoke {args.token}")


class RecordingMonitor(pulumi_mocks.MockMonitor):
    """The mock engine, also keeping each registration's URN, parent and resource options."""

    def __init__(self, mocks: InfraMocks) -> None:
        super().__init__(mocks)
        self.infra = mocks

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        # Registrations run on several threads: match the record by type and name.
        for registered in self.infra.resources:
            if registered.typ == request.type and registered.name == request.name \
                    and not registered.urn:
                registered.urn = response.urn
                registered.parent = request.parent
                registered.dependencies = list(request.dependencies)
                registered.ignore_changes = list(request.ignoreChanges)
                registered.additional_secret_outputs = list(request.additionalSecretOutputs)
                registered.aliases = [json_format.MessageToDict(alias)
                                      for alias in request.aliases]
                registered.retain_on_delete = bool(request.retainOnDelete)
                break
        return response


@dataclass
class ProgramRun:
    """What one run of the program registered."""

    stack: str
    resources: list[RegisteredResource]
    invokes: list[pulumi.runtime.MockCallArgs]
    outputs: dict[str, Any]
    secret_outputs: set[str]
    #: Warnings the program logged (`pulumi.log.warn`), in order.
    warnings: list[str] = field(default_factory=list)

    def of_type(self, typ: str) -> list[RegisteredResource]:
        """Every registered resource of one type token."""
        return [r for r in self.resources if r.typ == typ]

    def one(self, typ: str, name: str | None = None) -> RegisteredResource:
        """The single resource of a type (and logical name, when given)."""
        found = [r for r in self.of_type(typ) if name is None or r.name == name]
        if len(found) != 1:
            raise AssertionError(f"expected one {typ} {name or ''}, found "
                                 f"{[r.name for r in found]}")
        return found[0]

    def kubernetes_objects(self) -> Iterator[RegisteredResource]:
        """Every Kubernetes object (not provider) the program declares."""
        return (r for r in self.resources
                if r.typ.startswith("kubernetes:") and r.custom)


class _CollectedLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_under_mocks(build: Callable[[], Mapping[str, Any] | None], *, stack: str = "test",
                    preview: bool = False) -> ProgramRun:
    """Run `build` as a Pulumi program under fresh recording mocks.

    Args:
        build: Declares resources; may return outputs to resolve besides `pulumi.export`s.
        stack: The stack name the program sees.
        preview: Run as `pulumi preview` does (unknown computed outputs).

    Returns:
        Everything registered, the resolved outputs (exports and returned ones), which of them
        are secret, and the warnings logged.
    """
    project = yaml.safe_load(PROJECT_FILE.read_text())["name"]
    mocks = InfraMocks()
    monitor = RecordingMonitor(mocks)
    engine_log = logging.getLogger(f"{__name__}.engine")
    engine_log.propagate = False
    collected = _CollectedLog()
    engine_log.addHandler(collected)
    pulumi.runtime.set_mocks(mocks, project=project, stack=stack, preview=preview,
                             logger=engine_log, monitor=monitor)
    outputs: dict[str, Any] = {}
    secret_outputs: set[str] = set()

    @pulumi.runtime.test
    def program() -> pulumi.Output[None]:
        root = get_root_resource()
        assert isinstance(root, pulumi_stack.Stack)
        root.outputs.clear()
        returned = build() or {}
        exported = {**root.outputs, **returned}
        root.outputs.clear()
        # Resolve every output with its secret-ness, as the engine would store it in state.
        names = list(exported)
        resolved = [pulumi.Output.from_input(exported[n]) for n in names]
        flags = [o.is_secret() for o in resolved]

        def record(values: list[Any]) -> None:
            for index, name in enumerate(names):
                outputs[name] = values[index]
                if values[len(names) + index]:
                    secret_outputs.add(name)

        return pulumi.Output.all(*resolved, *flags).apply(record)

    try:
        program()
    finally:
        engine_log.removeHandler(collected)
    return ProgramRun(stack=stack, resources=mocks.resources, invokes=mocks.invokes,
                      outputs=outputs, secret_outputs=secret_outputs,
                      warnings=collected.messages)


def run_program(stack: str = "dev", overrides: Mapping[str, Any] | None = None, *,
                fill_placeholders: bool = True, secrets: Mapping[str, Any] | None = None,
                preview: bool = False) -> ProgramRun:
    """Run `__main__.py` for a stack under mocks and return what it registered.

    Args:
        stack: The stack whose `Pulumi.<stack>.yaml` is read.
        overrides: Project keys (without namespace) replacing the stack's values.
        fill_placeholders: Replace CHANGE_ME values as an operator would.
        secrets: Secret keys and values; the test PATs by default.
        preview: Run as `pulumi preview` does (unknown computed outputs).

    Raises:
        Whatever the program raises, e.g. `StackConfigError` for a bad config.
    """
    config, secret_keys = effective_config(stack, overrides, fill_placeholders=fill_placeholders,
                                           secrets=secrets)
    pulumi.runtime.set_all_config(config, secret_keys)

    def main() -> None:
        sys.path.insert(0, str(REPO_ROOT))
        try:
            runpy.run_path(str(PROGRAM), run_name="__main__")
        finally:
            sys.path.remove(str(REPO_ROOT))

    try:
        return run_under_mocks(main, stack=stack, preview=preview)
    finally:
        pulumi.runtime.set_all_config({}, [])
