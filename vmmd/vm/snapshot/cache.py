"""Checked snapshots kept for the next restore, with one owner (the
daemon's Manager) and one lock.

A serverless daemon restores one snapshot over and over: reading, hashing
and parsing its state, checking its memory file against it, and converting
every component for the C core each time would cost more than the restore
itself.  An entry is valid while both files are the very same (device,
inode, size, times, as fstat of the files opened now says), so a snapshot
rewritten in place of another is read again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmmd.vm.snapshot.files import Snapshot

Identity = tuple[int, ...]


class SnapshotCache:
    def __init__(self, max_entries: int = 64) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        # directory -> (identity of its two files, the checked snapshot, derived values)
        self._entries: dict[Path, tuple[Identity, Snapshot, dict[str, Any]]] = {}

    def get(self, directory: Path, identity: Identity) -> Snapshot | None:
        with self._lock:
            hit = self._entries.get(directory)
        return hit[1] if hit is not None and hit[0] == identity else None

    def put(self, directory: Path, identity: Identity, snap: Snapshot) -> None:
        with self._lock:
            if directory not in self._entries and len(self._entries) >= self._max:
                self._entries.pop(next(iter(self._entries)))
            self._entries[directory] = (identity, snap, {})

    def derived(self, snap: Snapshot, name: str, make: Callable[[], Any]) -> Any:
        """What `make` derives from a cached snapshot (its state checked and
        converted for the C core), made once per snapshot; `make` runs
        again for a snapshot no longer (or never) in the cache."""
        with self._lock:
            hit = self._entries.get(snap.directory)
            extra = hit[2] if hit is not None and hit[1] is snap else None
            if extra is not None and name in extra:
                return extra[name]
        value = make()
        if extra is not None:
            with self._lock:
                extra[name] = value
        return value
