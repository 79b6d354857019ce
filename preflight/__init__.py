"""Node preflight: a pytest suite that says, per check, whether this node can serve, and how to fix it."""
