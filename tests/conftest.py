"""Pulumi mocks for the whole suite, set once before any test constructs a resource.

Tests that run the whole program call `tests.harness.mock_stack.run_program`, which installs
fresh recording mocks for its run; tests that construct one component use these.
"""

import pulumi

from tests.harness.mock_stack import InfraMocks

MOCKS = InfraMocks()
pulumi.runtime.set_mocks(MOCKS, project="gpu-runners", stack="test", preview=False)

# The fake Kubernetes and GitHub API servers, as fixtures for every test folder.
pytest_plugins = ["tests.fakes.fixtures"]
