"""Command-line entry points: `vmmd` (run, later serve) and `vmmctl`."""
