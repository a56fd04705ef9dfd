"""Sub-commands of the `cvxdist` CLI (see `cvxdist.cli`)."""
