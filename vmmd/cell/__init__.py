"""Cells: jailed worker processes that host VMs (docs/security.md)."""
