"""`python -m gpu_runners.broker`: serve the broker on 0.0.0.0:GPU_RUNNERS_BROKER_PORT.

In a cluster it uses its ServiceAccount (in-cluster config); elsewhere the kubeconfig that
KUBECONFIG names (how the tests run it against the fake API server). The GitHub credential is
the stack's GitHub App (installation tokens minted from the mounted key, GITHUB_APP_*) when one
is configured, else the PAT in the mounted file GITHUB_PAT_FILE names; both are re-read when the
kubelet updates the mount, so a rotated credential applies without a restart. Settings are
checked, all at once, before anything listens. On SIGTERM it stops accepting, ends the open
streams and exits without cleaning up: the runs' state is in the cluster and on GitHub, and the
clients' next requests adopt it.
"""

from __future__ import annotations

import logging
import os
import sys
from types import FrameType

import uvicorn
from kubernetes.client import ApiClient

from gpu_runners import contract
from gpu_runners.broker.app import broker_app
from gpu_runners.broker.oidc import OidcVerifier
from gpu_runners.broker.runs import CALL_THREADS, SPAWN_THREADS, RunOperations
from gpu_runners.broker.settings import BrokerSettings
from gpu_runners.errors import GpuRunnersError
from gpu_runners.github_api import GitHubClient, RunnerScope
from gpu_runners.github_app import RECOVERY_PERMISSIONS, token_source_from_environ
from gpu_runners.kube import KubeClient, load_api_client

LOGGER = logging.getLogger("gpu_runners.broker")
#: Seconds uvicorn waits for open requests after SIGTERM before cancelling them (streams
#: end at once on their own; this bounds a slow list or delete).
GRACEFUL_SHUTDOWN_SECONDS = 10
#: Connections to the Kubernetes API kept for reuse: a spawn holds up to three streams (its
#: pod watch, its event watch, its runner's log) besides its calls.
KUBE_CONNECTIONS = 4 * SPAWN_THREADS + CALL_THREADS


class _BrokerServer(uvicorn.Server):
    """uvicorn's server, telling the operations first when a signal asks it to stop, so
    that open spawn streams end instead of holding the shutdown."""

    operations: RunOperations | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.operations is not None:
            loop = self.operations.loop
            if loop is not None:
                loop.call_soon_threadsafe(self.operations.close)
        super().handle_exit(sig, frame)


def main() -> int:
    """Checks the settings, builds the clients and serves until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = BrokerSettings.from_environ(os.environ)
        environ = {**os.environ, contract.ENV_PAT_FILE: str(settings.pat_file)}
        tokens = token_source_from_environ(environ, repository_id=settings.repository_id,
                                           organization=False)
        # Preemption recovery re-runs and cancels workflow runs: with an App, a token of
        # its own narrowed to Actions: write, so the runner token stays without it.
        actions_tokens = token_source_from_environ(
            environ, repository_id=settings.repository_id, organization=False,
            permissions=RECOVERY_PERMISSIONS)
        api = load_api_client(environ=os.environ)
    except GpuRunnersError as e:
        print(f"gpu_runners.broker: {e}", file=sys.stderr)
        return 2
    github = GitHubClient(tokens, RunnerScope(repository=settings.repository),
                          api_url=settings.api_url)
    actions = GitHubClient(actions_tokens, RunnerScope(repository=settings.repository),
                           api_url=settings.api_url)
    app = broker_app(settings, kube=KubeClient(_pooled(api)), github=github,
                     verifier=OidcVerifier(settings.oidc_policy()), actions=actions)
    config = uvicorn.Config(app, host="0.0.0.0", port=settings.port,  # noqa: S104 - a pod's port
                            log_config=None, access_log=True, lifespan="on",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    server = _BrokerServer(config)
    server.operations = app.state.operations
    # After a graceful shutdown uvicorn re-raises the signal, which ends the process: spawns
    # still in worker threads are abandoned, not cleaned up. A restarted broker adopts what
    # they made when their jobs ask again, and the reaper takes what nobody asks for.
    server.run()
    return 0


def _pooled(api: ApiClient) -> ApiClient:
    """The same configuration with a connection pool sized for every spawn's streams."""
    configuration = api.configuration
    configuration.connection_pool_maxsize = KUBE_CONNECTIONS
    return ApiClient(configuration)


if __name__ == "__main__":
    sys.exit(main())
