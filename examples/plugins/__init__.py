"""Example plugins: `--plugin examples.plugins.NAME` (run from the repository root)."""
