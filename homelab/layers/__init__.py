"""Layer logic: read actual state, compute desired state, diff, apply."""
