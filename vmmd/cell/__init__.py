"""Cells: jailed worker processes that host VMs."""
