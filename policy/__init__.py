"""The policy pack guarding the GPU runner stack's security invariants (see `policies`)."""
