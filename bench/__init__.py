"""vmmd benchmarks: vmmd against QEMU microvm on the same guests, same machine, same run.

`python -m bench` (or `make bench`) runs every measure alternating vmmd and QEMU, writes
build/bench/results.json and build/bench/results.md and prints the markdown table.
"""
