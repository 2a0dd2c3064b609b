"""Benchmarks and experiments: scripts run from the checkout, not shipped in the
wheel."""
