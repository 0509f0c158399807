"""`ForkPrWorkflows`: whether a private repository runs workflows from fork pull requests.

GitHub's "Run workflows from fork pull requests" setting of a private repository decides
whether a fork's pull request can start jobs, and so reach the self-hosted runners. pulumi-github
6.15 cannot set it, so this dynamic resource calls the REST endpoint
`/repos/{owner}/{repo}/actions/permissions/fork-pr-workflows-private-repos` itself: create and
update PUT the declared settings and read them back, read GETs them (refresh), delete restores
GitHub's default. The endpoint exists only for private and internal repositories (GitHub answers
422 for a public one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pulumi
import pulumi.dynamic

DEFAULT_API_URL = "https://api.github.com"


class ForkPrWorkflowsProvider(pulumi.dynamic.ResourceProvider):
    """Create, read, diff, update and delete the fork pull request workflow settings.

    Pulumi stores this provider in the state with dill and runs it in the dynamic provider
    host, a process started in the project directory. Current SDKs store the class by reference
    (the host imports this module); it is nonetheless self-contained (standard-library imports
    inside the methods, constants on the class, built-in exception types) so that it also
    works when stored by value. It holds no credential: the token reaches each call through
    the resource's properties, which the state keeps encrypted.
    """

    #: The endpoint's four settings, with GitHub's values for a repository that never changed
    #: them: fork pull requests do not run workflows.
    GITHUB_DEFAULTS: ClassVar[dict[str, bool]] = {
        "run_workflows_from_fork_pull_requests": False,
        "send_write_tokens_to_workflows": False,
        "send_secrets_and_variables": False,
        "require_approval_for_fork_pr_workflows": False,
    }
    DEFAULT_API_URL: ClassVar[str] = DEFAULT_API_URL
    #: Properties that name the repository: changing one means another resource.
    IDENTITY_KEYS: ClassVar[tuple[str, ...]] = ("api_url", "owner", "repository")
    ENDPOINT: ClassVar[str] = "actions/permissions/fork-pr-workflows-private-repos"
    API_VERSION: ClassVar[str] = "2026-03-10"
    TIMEOUT_SECONDS: ClassVar[float] = 30.0
    #: What the Python dynamic provider host passes for a value not known during preview.
    UNKNOWN: ClassVar[str] = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"

    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> pulumi.dynamic.CheckResult:
        """Fill in defaults and reject inputs GitHub would refuse, naming the property."""
        import re

        inputs = {"api_url": self.DEFAULT_API_URL, **self.GITHUB_DEFAULTS,
                  **{key: value for key, value in news.items() if value is not None}}
        failures: list[pulumi.dynamic.CheckFailure] = []

        def known(key: str) -> bool:
            return inputs.get(key) != self.UNKNOWN

        def fail(key: str, reason: str) -> None:
            failures.append(pulumi.dynamic.CheckFailure(key, reason))

        for key, pattern, what in (
            ("owner", r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})", "a GitHub user or organisation name"),
            ("repository", r"[A-Za-z0-9._-]{1,100}", "a repository name without the owner"),
        ):
            value = inputs.get(key)
            if known(key) and not (isinstance(value, str) and re.fullmatch(pattern, value)):
                fail(key, f"{value!r} is not {what}")
        api_url = inputs["api_url"]
        if known("api_url") and not (isinstance(api_url, str)
                                     and re.fullmatch(r"https?://[^\s/]+(/\S*)?", api_url)):
            fail("api_url", f"{api_url!r} is not an http(s) URL such as {self.DEFAULT_API_URL}")
        token = inputs.get("token")
        if known("token") and not (isinstance(token, str) and token.strip()):
            fail("token", "is required: a token that administers the repository "
                          "(classic PAT with the repo scope)")
        for key in self.GITHUB_DEFAULTS:
            if known(key) and not isinstance(inputs[key], bool):
                fail(key, f"{inputs[key]!r} is not a boolean")
        # The other three settings only qualify runs that the first one allows.
        if inputs["run_workflows_from_fork_pull_requests"] is False:
            for key in list(self.GITHUB_DEFAULTS)[1:]:
                if inputs[key] is True:
                    fail(key, "can only be true when run_workflows_from_fork_pull_requests is "
                              "true")
        return pulumi.dynamic.CheckResult(inputs, failures)

    def create(self, props: dict[str, Any]) -> pulumi.dynamic.CreateResult:
        """PUT the declared settings, then read back what GitHub stores."""
        self._put(props, self._desired(props))
        return pulumi.dynamic.CreateResult(f"{props['owner']}/{props['repository']}",
                                           self._applied(props))

    def read(self, id_: str, props: dict[str, Any]) -> pulumi.dynamic.ReadResult:
        """The settings GitHub stores now; a repository that is gone is a resource that is gone."""
        answer = self._request("GET", props, None, missing_ok=True)
        if answer is None:
            return pulumi.dynamic.ReadResult("", {})
        return pulumi.dynamic.ReadResult(id_, {**props, **self._settings(props, answer)})

    def diff(self, _id: str, olds: dict[str, Any],
             news: dict[str, Any]) -> pulumi.dynamic.DiffResult:
        """Another repository is a replacement; another setting or token is an update."""
        changed = [key for key in (*self.IDENTITY_KEYS, *self.GITHUB_DEFAULTS, "token")
                   if news.get(key) == self.UNKNOWN or olds.get(key) != news.get(key)]
        replaces = [key for key in self.IDENTITY_KEYS if key in changed]
        # Delete first: "another" repository may be the same one spelled differently (owner's
        # case, api_url's form), and deleting after creating would reset what was just set.
        return pulumi.dynamic.DiffResult(changes=bool(changed), replaces=replaces,
                                         delete_before_replace=bool(replaces))

    def update(self, _id: str, _olds: dict[str, Any],
               news: dict[str, Any]) -> pulumi.dynamic.UpdateResult:
        """PUT the new settings, then read back what GitHub stores."""
        self._put(news, self._desired(news))
        return pulumi.dynamic.UpdateResult(self._applied(news))

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        """Restore GitHub's default; a repository that is gone has nothing to restore."""
        self._put(props, dict(self.GITHUB_DEFAULTS), missing_ok=True)

    # --- GitHub REST calls -----------------------------------------------------------------------

    def _desired(self, props: dict[str, Any]) -> dict[str, bool]:
        return {key: bool(props[key]) for key in self.GITHUB_DEFAULTS}

    def _applied(self, props: dict[str, Any]) -> dict[str, Any]:
        """The properties with the settings GitHub reports, which must be the ones sent."""
        live = self._settings(props, self._request("GET", props, None, missing_ok=False))
        desired = self._desired(props)
        if live != desired:
            differing = ", ".join(f"{key}={live[key]}" for key in desired
                                  if live[key] != desired[key])
            raise RuntimeError(
                f"GitHub accepted the fork pull request workflow settings of "
                f"{props['owner']}/{props['repository']} but reports {differing}: an "
                "organization or enterprise policy probably overrides the repository's setting")
        return {**props, **live}

    def _settings(self, props: dict[str, Any], body: Any) -> dict[str, bool]:
        """The four settings of a GET answer, which must all be there."""
        if not (isinstance(body, dict)
                and all(isinstance(body.get(key), bool) for key in self.GITHUB_DEFAULTS)):
            raise RuntimeError(
                f"GitHub answered the fork pull request workflow settings of "
                f"{props['owner']}/{props['repository']} with {body!r}, which lacks the boolean "
                f"fields {', '.join(self.GITHUB_DEFAULTS)}")
        return {key: body[key] for key in self.GITHUB_DEFAULTS}

    def _put(self, props: dict[str, Any], settings: dict[str, bool], *,
             missing_ok: bool = False) -> None:
        self._request("PUT", props, settings, missing_ok=missing_ok)

    def _request(self, method: str, props: dict[str, Any], body: dict[str, bool] | None, *,
                 missing_ok: bool) -> Any:
        """One call to the endpoint; GitHub's refusals become errors that say what to fix.

        Returns:
            The decoded JSON answer, None for an empty answer (204) or, with `missing_ok`, for a
            repository GitHub does not find (404).
        """
        import json
        import urllib.error
        import urllib.parse
        import urllib.request

        owner, repository = props["owner"], props["repository"]
        full_name = f"{owner}/{repository}"
        url = (f"{str(props['api_url']).rstrip('/')}/repos/{urllib.parse.quote(owner)}/"
               f"{urllib.parse.quote(repository)}/{self.ENDPOINT}")
        # check() admits only http(s) URLs, so neither call can be steered to file: or ftp:.
        request = urllib.request.Request(url, method=method, headers={
            "Accept": "application/vnd.github+json",
            "Authorization": f"Bearer {props['token']}",
            "X-GitHub-Api-Version": self.API_VERSION,
            "User-Agent": "gpu-runners-pulumi",
        })
        if body is not None:
            request.data = json.dumps(body).encode()
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.TIMEOUT_SECONDS) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            try:
                message = json.loads(error.read() or b"{}").get("message", "")
            except ValueError:
                message = ""
            said = f" GitHub said: {message}" if message else ""
            if error.code == 404 and missing_ok:
                return None
            if error.code == 401:
                raise PermissionError(
                    f"GitHub rejected the token for {full_name} (401): it is invalid, expired "
                    "or revoked. Set a valid token: a classic PAT with the repo scope, or a "
                    f"fine-grained token with Administration: write on the repository.{said}"
                ) from None
            if error.code == 403:
                raise PermissionError(
                    f"GitHub refused {method} of the fork pull request workflow settings of "
                    f"{full_name} (403): the token needs the repo scope (classic PAT) or "
                    "Administration: write (fine-grained), and an organization or enterprise "
                    f"policy must not manage this setting.{said}"
                ) from None
            if error.code == 404:
                raise LookupError(
                    f"GitHub does not find repository {full_name} at {props['api_url']} (404): "
                    "check owner and repository, and that the token can see it (a classic PAT "
                    f"needs the repo scope for a private repository).{said}"
                ) from None
            if error.code == 422:
                raise ValueError(
                    f"GitHub refused the fork pull request workflow settings of {full_name} "
                    "(422): the setting exists only for private and internal repositories; "
                    f"is {full_name} public?{said}"
                ) from None
            raise RuntimeError(
                f"GitHub answered {error.code} to {method} {url}.{said}") from None
        except OSError as error:  # URLError, timeouts, connections reset or refused
            reason = getattr(error, "reason", error)
            raise ConnectionError(
                f"could not reach GitHub at {props['api_url']} for {full_name} within "
                f"{self.TIMEOUT_SECONDS:g} s: {reason}") from None
        return json.loads(payload) if payload.strip() else None


@dataclass(frozen=True)
class ForkPrWorkflowsArgs:
    """The repository and its fork pull request settings; the defaults turn fork runs off."""

    owner: pulumi.Input[str]
    #: Repository name without the owner.
    repository: pulumi.Input[str]
    #: Token that administers the repository (classic PAT with repo scope); stored as a secret.
    token: pulumi.Input[str]
    api_url: pulumi.Input[str] = DEFAULT_API_URL
    run_workflows_from_fork_pull_requests: pulumi.Input[bool] = False
    send_write_tokens_to_workflows: pulumi.Input[bool] = False
    send_secrets_and_variables: pulumi.Input[bool] = False
    require_approval_for_fork_pr_workflows: pulumi.Input[bool] = False


class ForkPrWorkflows(pulumi.dynamic.Resource, module="gpu-runners", name="ForkPrWorkflows"):
    """GitHub's fork pull request workflow settings of one private repository.

    Type `pulumi-python:dynamic/gpu-runners:ForkPrWorkflows`, id `owner/repository`. Its
    outputs are the settings GitHub reports after each create, update or refresh; the token
    is an input and an output only as a secret.
    """

    owner: pulumi.Output[str]
    repository: pulumi.Output[str]
    api_url: pulumi.Output[str]
    run_workflows_from_fork_pull_requests: pulumi.Output[bool]
    send_write_tokens_to_workflows: pulumi.Output[bool]
    send_secrets_and_variables: pulumi.Output[bool]
    require_approval_for_fork_pr_workflows: pulumi.Output[bool]

    def __init__(self, name: str, args: ForkPrWorkflowsArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        """Declare the settings of `args.owner`/`args.repository`.

        Args:
            name: Logical name of the resource.
            args: Repository, token and settings.
            opts: Resource options (parent, provider-independent options such as protect).
        """
        props: dict[str, Any] = {
            "owner": args.owner,
            "repository": args.repository,
            # Secret even when the caller passes a plain string: the state must never hold it
            # in plaintext, nor show it in outputs.
            "token": pulumi.Output.secret(args.token),
            "api_url": args.api_url,
            "run_workflows_from_fork_pull_requests": args.run_workflows_from_fork_pull_requests,
            "send_write_tokens_to_workflows": args.send_write_tokens_to_workflows,
            "send_secrets_and_variables": args.send_secrets_and_variables,
            "require_approval_for_fork_pr_workflows": args.require_approval_for_fork_pr_workflows,
        }
        super().__init__(
            ForkPrWorkflowsProvider(), name, props,
            pulumi.ResourceOptions.merge(
                opts, pulumi.ResourceOptions(additional_secret_outputs=["token"])),
        )
