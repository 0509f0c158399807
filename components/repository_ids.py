"""The numeric GitHub ids of the stack's repository and its owner, looked up at `pulumi up`.

The broker compares the OIDC tokens' `repository_id` and `repository_owner_id` claims with
them: names can be recycled (a deleted repository's name taken by someone else), ids cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_github as github


@dataclass(frozen=True)
class RepositoryIds:
    """The numeric GitHub ids of the stack's repository and of its owner, as decimal strings."""

    repository_id: pulumi.Output[str]
    owner_id: pulumi.Output[str]


def _decimal_id(value: float | int | str) -> str:
    # Numbers cross the engine's protocol as floats (74.0); OIDC claims carry "74".
    number = int(value)
    if number <= 0:
        raise ValueError(f"GitHub returned {value!r} where a positive numeric id was expected")
    return str(number)


def resolve_repository_ids(owner: str, repository: str,
                           provider: pulumi.ProviderResource) -> RepositoryIds:
    """Look up the numeric ids GitHub gives `owner/repository` and `owner`.

    Args:
        owner: The repository's owner, a user or an organisation (`GET /users/{name}` answers
            for both, so one data source serves both).
        repository: The repository's name without the owner.
        provider: The explicit GitHub provider: the stack disables default providers, so an
            invoke without one fails on a real engine.

    Returns:
        The ids, resolved when the data sources answer (at preview and at up).
    """
    opts = pulumi.InvokeOutputOptions(provider=provider)
    found = github.get_repository_output(full_name=f"{owner}/{repository}", opts=opts)
    account = github.get_user_output(username=owner, opts=opts)
    return RepositoryIds(repository_id=found.repo_id.apply(_decimal_id),
                         owner_id=account.id.apply(_decimal_id))
