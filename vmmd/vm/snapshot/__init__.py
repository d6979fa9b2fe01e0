"""Snapshots, in one place: a paused VM saved to a directory, and a VM
built again from one.

- format.py: the files' format (the state's frame, the memory header) and
  the checks of one against the other;
- files.py: the directory (opened once, locked, ours or refused), atomic
  writes, validated reads;
- state.py: each component's state, C core <-> snapshot.proto, every
  field of a file checked;
- take.py: the order of saving; apply.py: the order of restoring;
- merge.py: a diff onto its base;
- cache.py: checked snapshots kept for the next restore (the Manager owns
  one).

The builder (vm/builder.py) constructs a VM from a snapshot with these.
"""

from vmmd.vm.snapshot.apply import apply_state
from vmmd.vm.snapshot.cache import SnapshotCache
from vmmd.vm.snapshot.files import Snapshot, SnapshotDir, opened, read, write, writing
from vmmd.vm.snapshot.format import (
    DIFF,
    FORMAT_VERSION,
    FULL,
    MARKER_FILE,
    MEMORY_FILE,
    MEMORY_HEADER,
    MEMORY_OFFSET,
    PAGE,
    PREV_MEMORY_FILE,
    STATE_FILE,
    STATE_HEADER,
    frame,
    memory_header,
    new_id,
)
from vmmd.vm.snapshot.merge import merge, merge_snapshots
from vmmd.vm.snapshot.take import take_snapshot

__all__ = [
    "DIFF", "FORMAT_VERSION", "FULL", "MARKER_FILE", "MEMORY_FILE", "MEMORY_HEADER",
    "MEMORY_OFFSET", "PAGE", "PREV_MEMORY_FILE", "STATE_FILE", "STATE_HEADER", "Snapshot",
    "SnapshotCache", "SnapshotDir", "apply_state", "frame", "memory_header", "merge",
    "merge_snapshots", "new_id", "opened", "read", "take_snapshot", "write", "writing",
]  # fmt: skip
