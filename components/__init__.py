"""The Pulumi components of one GPU-runner stack, one component per module."""
