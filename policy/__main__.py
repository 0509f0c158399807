"""Entry point of the policy pack: `pulumi preview --policy-pack policy` runs this file.

Constructing `PolicyPack` starts the analyzer's gRPC server and blocks until the Pulumi CLI
stops it, so nothing imports this module; the policies live in `policies.py`.
"""

import sys
from pathlib import Path

# The CLI runs the pack from this directory, but its policies check the project's shared names
# (gpu_runners/contract.py, which imports nothing), so the repository root goes on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pulumi_policy import EnforcementLevel, PolicyPack

from policy.policies import POLICIES

PolicyPack(
    name="gpu-runners-security",
    description="Security invariants of the GPU runner stack: scale-to-zero GPU pools, "
                "restricted pods pinned by digest, workload identity, secret-only Actions "
                "secrets, a protected main branch, no service-account keys outside seed "
                "compatibility.",
    enforcement_level=EnforcementLevel.MANDATORY,
    policies=list(POLICIES),
)
