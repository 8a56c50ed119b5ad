"""Recurrences and sequence ops as pure functions (no hooks, no modules)."""
