"""Domain exceptions of gpu_runners, each carrying the CLI exit code it maps to.

Every failure a user can act on is one of these, with a message that fits on one line and
names what to change (an option, an environment variable, a token scope, a RBAC verb). The
CLI prints the message and exits with `exit_code`; library callers catch the class they care
about. Lower-level exceptions are chained (`raise ... from e`) so a traceback still shows the
HTTP or socket error underneath.
"""

from __future__ import annotations


class GpuRunnersError(Exception):
    """Base class of every error gpu_runners reports to its caller."""

    exit_code = 1


class UsageError(GpuRunnersError):
    """An option or environment variable is missing or malformed; raised before any API call."""

    exit_code = 2


# --- GitHub ------------------------------------------------------------------------------------


class GitHubError(GpuRunnersError):
    """A GitHub REST call failed after its retries."""

    exit_code = 3

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        #: HTTP status of the last response, None when the request never got one.
        self.status = status


class GitHubAuthError(GitHubError):
    """GitHub refused the token (401), or the token lacks a scope or permission (403)."""


class GitHubNotFoundError(GitHubError):
    """GitHub answered 404: a missing object, or a repository the token cannot see."""


class GitHubConflictError(GitHubError):
    """GitHub answered 409, e.g. a runner with the requested name already exists."""


class RunnerBusyError(GitHubError):
    """GitHub answered 422 to a runner deletion because the runner is running a job."""


class GitHubRateLimitError(GitHubError):
    """The rate limit stays exhausted for longer than the caller is willing to wait."""


# --- Kubernetes --------------------------------------------------------------------------------


class KubernetesError(GpuRunnersError):
    """A Kubernetes API call failed after its retries, or the client could not be configured."""

    exit_code = 4

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AlreadyExistsError(KubernetesError):
    """The object to create exists already (409 AlreadyExists)."""


class QuotaExceededError(KubernetesError):
    """A ResourceQuota of the namespace refused the object (403 "exceeded quota")."""


# --- What a GPU pod can end up as while spawn waits for it -------------------------------------


class SpawnFailedError(GpuRunnersError):
    """The GPU runner did not come up; subclasses say why."""

    exit_code = 7


class NoCapacityError(SpawnFailedError):
    """No node can take the pod and no scale-up is coming (for every GPU type asked)."""

    exit_code = 5


class ImagePullError(SpawnFailedError):
    """The kubelet cannot pull the runner image."""

    exit_code = 6


class PodFailedError(SpawnFailedError):
    """The pod failed, ended, or was deleted before its runner came online."""

    exit_code = 7


class PodPreemptedError(PodFailedError):
    """The pod was lost to its node (a Spot VM reclaimed, a node removed) before its runner
    came online: not the job's doing, so the broker may start a replacement.

    Attributes:
        stage: The furthest stage the pod had reached ("scheduled", "image pulling", ...).
        cause: What happened to its node.
        node: The node it had been scheduled to ("" if none).
    """

    def __init__(self, message: str, *, stage: str, cause: str, node: str = "") -> None:
        super().__init__(message)
        self.stage = stage
        self.cause = cause
        self.node = node


class WaitTimeoutError(SpawnFailedError):
    """The runner was not online within the wait timeout."""

    exit_code = 8


class SpawnCancelledError(SpawnFailedError):
    """The spawn was told to stop (the broker got a DELETE for its run); it cleaned up."""

    exit_code = 7


class GpuCapReachedError(QuotaExceededError):
    """The repository's runners already hold the stack's GPU cap; waited out like a quota."""


class Interrupted(BaseException):  # noqa: N818 - a signal, not an error: named for what happened
    """SIGINT or SIGTERM arrived; raised in the main thread by the CLI's signal handler.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way up
    swallows it before spawn has removed what it created.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process killed by it (130, 143)."""
        return 128 + self.signum
