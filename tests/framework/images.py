"""Disk images as the host sees them."""

from __future__ import annotations

import struct
from pathlib import Path

SUPERBLOCK = 1024
S_MTIME, S_MNT_COUNT = 0x2C, 0x34  # ext4 superblock fields (le32, le16)


def superblock(image: Path) -> tuple[int, int]:
    """(mount time, mount count) of an ext4 image."""
    with image.open("rb") as f:
        f.seek(SUPERBLOCK)
        sb = f.read(0x40)
    return struct.unpack_from("<I", sb, S_MTIME)[0], struct.unpack_from("<H", sb, S_MNT_COUNT)[0]
