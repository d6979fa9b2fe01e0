"""The snapshot file format: names, the state file's frame, the memory
file's header, and the checks of both against each other.

`vmstate` is magic, format version, payload length, sha256, then a
SnapshotState message (proto/vmmd/v1/snapshot.proto); `memory` is a
4096-byte header naming the snapshot id, kind and RAM size, then guest RAM
(a full snapshot: all of it, zero pages as holes; a diff: the dirty pages,
packed, as the state's bitmap says).  The header's id binds the two files.
Everything read here is untrusted: sizes are bounded before reading, the
payload is checksummed before parsing.
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
from pathlib import Path

from vmmd._proto.vmmd.v1 import snapshot_pb2 as spb
from vmmd.errors import DataLossError, InvalidSpecError, shown

STATE_FILE, MEMORY_FILE = "vmstate", "memory"
PREV_MEMORY_FILE = ".memory.prev"  # the old memory while a new snapshot is put in place
MARKER_FILE = ".vmmd-snapshot"
MARKER_TEXT = b"vmmd snapshot directory: vmstate and memory are written by vmmd\n"
FORMAT_VERSION = 1
STATE_MAGIC = b"VMMDSNAP"
STATE_HEADER = struct.Struct("<8sIQ32s")   # magic, version, payload length, sha256
MEMORY_MAGIC = b"VMMDMEM1"
MEMORY_HEADER = struct.Struct("<8sI16sIQ")  # magic, version, snapshot id, kind, RAM bytes
MEMORY_OFFSET = 4096                        # RAM starts here (mmap needs page alignment)
PAGE = 4096
MAX_STATE_BYTES = 64 << 20                  # far above any real state; bounds a hostile file
FULL, DIFF = spb.SNAPSHOT_KIND_FULL, spb.SNAPSHOT_KIND_DIFF


def new_id() -> str:
    return uuid.uuid4().hex


def frame(state: spb.SnapshotState) -> bytes:
    payload = state.SerializeToString()
    return STATE_HEADER.pack(STATE_MAGIC, FORMAT_VERSION, len(payload),
                             hashlib.sha256(payload).digest()) + payload


def memory_header(snapshot_id: str, kind: int, ram_bytes: int) -> bytes:
    head = MEMORY_HEADER.pack(MEMORY_MAGIC, FORMAT_VERSION, bytes.fromhex(snapshot_id), kind,
                              ram_bytes)
    return head.ljust(MEMORY_OFFSET, b"\0")


def parse_state(path: Path, fd: int) -> spb.SnapshotState:
    with open(fd, "rb", closefd=False) as f:
        f.seek(0)
        head = f.read(STATE_HEADER.size)
        if len(head) < STATE_HEADER.size:
            raise DataLossError(f"{path}: truncated ({len(head)} bytes, no complete header)")
        magic, version, length, digest = STATE_HEADER.unpack(head)
        if magic != STATE_MAGIC:
            raise DataLossError(f"{path}: not a vmmd snapshot state file (bad magic)")
        if version != FORMAT_VERSION:
            raise InvalidSpecError("snapshot_dir", f"{path} has snapshot format version "
                                   f"{version}; this vmmd reads version {FORMAT_VERSION}")
        if length > MAX_STATE_BYTES:
            raise DataLossError(f"{path}: header claims {length} bytes of state")
        payload = f.read(length + 1)
    if len(payload) != length:
        raise DataLossError(f"{path}: {'truncated' if len(payload) < length else 'trailing data'}"
                            f" ({len(payload)} bytes of state, the header says {length})")
    if hashlib.sha256(payload).digest() != digest:
        raise DataLossError(f"{path}: checksum mismatch (the state was altered or damaged)")
    state = spb.SnapshotState()
    try:
        state.ParseFromString(payload)
    except Exception as e:  # noqa: BLE001 - a checksummed payload that does not parse
        raise DataLossError(f"{path}: state does not parse: {e}") from None
    if state.format_version != FORMAT_VERSION:
        raise DataLossError(f"{path}: state says format {state.format_version}, frame "
                            f"{FORMAT_VERSION}")
    return state


def check_memory(path: Path, fd: int, size: int, state: spb.SnapshotState,
                  ram_bytes: int) -> None:
    head = os.pread(fd, MEMORY_HEADER.size, 0)
    if len(head) < MEMORY_HEADER.size:
        raise DataLossError(f"{path}: truncated (no complete header)")
    magic, version, sid, kind, ram = MEMORY_HEADER.unpack(head)
    if magic != MEMORY_MAGIC or version != FORMAT_VERSION:
        raise DataLossError(f"{path}: not a vmmd memory file of format {FORMAT_VERSION}")
    if sid.hex() != state.snapshot_id or kind != state.kind:
        raise DataLossError(f"{path} belongs to another snapshot ({sid.hex()}, the state is "
                            f"{state.snapshot_id}): the snapshot was not written completely")
    if ram != ram_bytes:
        raise DataLossError(f"{path}: holds {ram} bytes of RAM, the state names {ram_bytes}")
    want = MEMORY_OFFSET + (ram_bytes if kind == FULL else
                            PAGE * sum(b.bit_count() for b in state.dirty_bitmap))
    if size != want:
        raise DataLossError(f"{path} is {size} bytes, the state needs {want} "
                            f"({'truncated' if size < want else 'too long'})")


def check_state(path: Path, state: spb.SnapshotState) -> int:
    """The state's own consistency; its RAM size."""
    if state.kind not in (FULL, DIFF):
        raise DataLossError(f"{path}: unknown snapshot kind {state.kind}")
    if len(state.snapshot_id) != 32 or not all(c in "0123456789abcdef" for c in state.snapshot_id):
        raise DataLossError(f"{path}: bad snapshot id {shown(state.snapshot_id)!r}")
    ram_bytes = sum(r.size for r in state.memory)
    pages = ram_bytes // PAGE
    if state.kind == DIFF and len(state.dirty_bitmap) != (pages + 7) // 8:
        raise DataLossError(f"{path}: dirty bitmap of {len(state.dirty_bitmap)} bytes "
                            f"for {pages} pages")
    if state.kind == DIFF and pages % 8 and state.dirty_bitmap[-1] >> (pages % 8):
        raise DataLossError(f"{path}: dirty bitmap marks pages beyond the {pages} "
                            "pages of RAM")
    return ram_bytes


