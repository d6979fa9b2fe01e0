#!/usr/bin/env python3
"""Build the vmmd micro-guests (tiny freestanding x86-64 test programs).

``build(out_dir)`` compiles two flavours of the same program with gcc and
returns their paths::

    {"pvh": <out_dir>/microguest-pvh.elf,   # PVH ELF note: 32-bit entry, EBX = hvm_start_info
     "64":  <out_dir>/microguest-64.elf}    # no note: Linux 64-bit entry at e_entry, RSI = zero page

Outputs are rebuilt only when a source file, the flags or the compiler
changed (a sha256 stamp next to each output); concurrent callers serialize
on a lock file in ``out_dir`` and outputs are replaced atomically.

Run as a script: ``python3 tests/guests/build.py [out_dir]`` (default
``<repo>/build/guests``) prints ``name path`` lines.

See README.md in this directory for the boot protocols, the modes and the
exact port / MMIO accesses of each mode.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_OUT = REPO / "build" / "guests"

SOURCES = ("mg.h", "virtio.h", "entry.S", "rt.c", "main.c", "virtio.c", "blk.c", "net.c", "rng.c",
           "vsock.c",
           "link.ld")
# The virtio-mmio register table is the device's (native/), included from
# there so guest and device cannot disagree; an input like the sources above.
NATIVE = REPO / "native"
SHARED_HEADERS = (NATIVE / "virtio_mmio_regs.h",)
COMPILE_UNITS = ("entry.S", "rt.c", "main.c", "virtio.c", "blk.c", "net.c", "rng.c", "vsock.c")
LINKER_SCRIPT = "link.ld"

# Required flags, then the ones that keep gcc from emitting anything a
# freestanding, emulated-ring-0 guest cannot run (endbr64, stack protector,
# unwind tables, memset idioms, non-baseline instructions).
CFLAGS = (
    "-ffreestanding", "-nostdlib", "-fno-pic", "-no-pie", "-mno-red-zone",
    "-mgeneral-regs-only", "-mcmodel=small", "-O2", "-static",
    "-Wall", "-Wextra", "-Werror",
    "-std=gnu11", "-march=x86-64", "-mtune=generic", "-fno-stack-protector",
    "-fcf-protection=none", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables",
    "-fno-tree-loop-distribute-patterns", "-fno-jump-tables",
    "-Wl,--build-id=none", "-Wl,-z,max-page-size=0x1000", "-Wl,-z,noexecstack",
    "-Wl,--no-warn-rwx-segments", "-Wl,--orphan-handling=error",
)

FLAVOURS = {
    "pvh": ("microguest-pvh.elf", ("-DMG_PVH=1",)),
    "64": ("microguest-64.elf", ()),
}

# Physical addresses the guest uses (mirrors mg.h; documented in README.md).
LOAD_ADDR = 0x200000
MAILBOX_ADDR = 0x200000
MAILBOX = {
    "magic": (0x000, 8),      # b"MGMBOX01" once the C runtime runs
    "boot": (0x008, 4),       # 1 = PVH, 2 = Linux 64-bit
    "state": (0x00C, 4),      # 0 loaded, 1 C entered, 2 mode running, 3 ending
    "count": (0x010, 8),      # mg=count counter
    "tick": (0x018, 8),       # last MG-TICK sequence number
    "progress": (0x020, 8),   # iterations done (exits, mmio, spin)
    "tsc_khz": (0x028, 8),    # TSC frequency used by mg=tick
    "ap_slot": (0x030, 4),
    "ap_done": (0x034, 4),    # APs checked in (mg=smp)
    "boot_info": (0x038, 8),  # address of hvm_start_info / zero page
    "apic_ids": (0x040, 4 * 255),
    "cmdline": (0x800, 2048),
}
MAILBOX_MAGIC = b"MGMBOX01"
AP_TRAMPOLINE_ADDR = 0x3000
PAGE_TABLES_NOTE = "own PML4/PDPT/4 PDs in .bss (0-4 GiB, 2 MiB pages)"
UNHANDLED_PORT = 0x510
DEFAULT_MMIO_ADDR = 0xD0000000

XEN_ELFNOTE_PHYS32_ENTRY = 18

# mg=blk (blk.c): the ring memory and the data buffer live in the image's .bss.noinit.
BLK_SECTOR = 512
BLK_BUF_SIZE = 1 << 20          # largest count= is BLK_BUF_SIZE // 512 sectors
BLK_QUEUE_MAX = 256             # largest qsize= the guest has ring memory for
BLK_QUEUE_DEFAULT = 64          # qsize when not given: min(QueueNumMax, 64)
BLK_HOSTILE_ADDR = 0x7FFF00000000


def blk_pattern(seed: int, nbytes: int) -> bytes:
    """What `mg=blk op=write seed=<seed>` writes: byte i = (seed*31 + i*7 + (i>>9)) & 0xff."""
    return bytes((seed * 31 + i * 7 + (i >> 9)) & 0xFF for i in range(nbytes))


def fnv1a32(data: bytes) -> int:
    """The `sum=` of `MG-BLK-READ` and `MG-NET-FRAME`: 32-bit FNV-1a of the bytes."""
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


# mg=net (net.c): frame format and limits (README.md, "virtio-net").
NET_ETHERTYPE = 0x88B5          # local experimental ethertype of every frame the guest builds
NET_HDR = 12                    # struct virtio_net_hdr_v1 (VERSION_1: always 12 bytes)
NET_FRAME_MIN = 22              # Ethernet header (14) + u32 seq + u32 dev
NET_FRAME_MAX = 1514            # largest size= (TX frames; RX with mrg=1 may be larger)
NET_FRAME_DEFAULT = 60          # size= when not given
NET_BUF_DEFAULT = 2048          # bufsize= when not given (RX buffer, header included)
NET_BUF_MIN = 64
NET_BUF_MAX = 65536
NET_QUEUE_MAX = 256             # largest qsize= (both queues); default min(QueueNumMax, 256)
NET_TX_SLOTS = 64               # TX frame buffers per device: send keeps min(qsize/2, 64) in flight
NET_POOL = 1 << 20              # buffer memory, split evenly between the open devices
NET_SLOT = 1536                 # bytes per TX frame buffer (the first 64 * 1536 of a device's share)
NET_DST_DEFAULT = b"\xff" * 6
NET_HOSTILE_ADDR = 0x7FFF00000000


def net_frame(seq: int, dev: int, size: int, seed: int, src_mac: bytes,
              dst_mac: bytes = NET_DST_DEFAULT) -> bytes:
    """The exact Ethernet frame (no virtio header) `mg=net` sends as frame `seq` of net device `dev`:
    dst, src, ethertype 0x88b5, u32 LE seq, u32 LE dev, then byte j = (seed + seq + j) & 0xff."""
    if not NET_FRAME_MIN <= size <= NET_FRAME_MAX or len(src_mac) != 6 or len(dst_mac) != 6:
        raise ValueError("size 22..1514, 6-byte MACs")
    head = dst_mac + src_mac + NET_ETHERTYPE.to_bytes(2, "big") + struct.pack("<II", seq & 0xFFFFFFFF, dev)
    return head + bytes((seed + seq + j) & 0xFF for j in range(size - NET_FRAME_MIN))


def net_rx_buffers(qsize: int, bufsize: int = NET_BUF_DEFAULT, ndev: int = 1) -> int:
    """How many RX buffers the guest posts: min(qsize, (its share of NET_POOL - TX buffers) // bufsize)."""
    return min(qsize, (NET_POOL // ndev - NET_TX_SLOTS * NET_SLOT) // bufsize)


class BuildError(RuntimeError):
    pass


def _cc() -> str:
    return os.environ.get("CC", "gcc")


def _compiler_id(cc: str) -> bytes:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"cannot run C compiler {cc!r}: {e}") from e
    return out.splitlines()[0] if out else b""


def _digest(compiler_id: bytes, extra: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    h.update(compiler_id + b"\0")
    for f in (*CFLAGS, *extra):
        h.update(f.encode() + b"\0")
    for path in (*(HERE / name for name in SOURCES), *SHARED_HEADERS):
        name = str(path.relative_to(REPO))
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _compile(cc: str, extra: tuple[str, ...], out: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *CFLAGS, *extra, "-I", str(HERE), "-idirafter", str(NATIVE),
               "-T", str(HERE / LINKER_SCRIPT),
               *(str(HERE / u) for u in COMPILE_UNITS), "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"{' '.join(cmd)}\n{r.stdout}{r.stderr}")
        check_elf(Path(tmp), pvh="-DMG_PVH=1" in extra)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_elf(path: Path, pvh: bool) -> None:
    """Sanity-check the linked image: layout, entry and (absence of) the PVH note."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError(f"{path}: not a little-endian ELF64")
    (e_entry, e_phoff, e_phentsize, e_phnum) = (
        struct.unpack_from("<Q", data, 24)[0], struct.unpack_from("<Q", data, 32)[0],
        struct.unpack_from("<H", data, 54)[0], struct.unpack_from("<H", data, 56)[0])
    loads, notes = [], []
    for i in range(e_phnum):
        p_type, _flags, off, vaddr, paddr, filesz, memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == 1:
            loads.append((vaddr, paddr, filesz, memsz))
        elif p_type == 4:
            notes.append(data[off:off + filesz])
    if not loads or loads[0][1] != LOAD_ADDR or any(v != p for v, p, _, _ in loads):
        raise BuildError(f"{path}: PT_LOAD must start at {LOAD_ADDR:#x} with vaddr == paddr")
    start, end = loads[0][1], max(p + m for _, p, _, m in loads)
    if not start < e_entry < end:
        raise BuildError(f"{path}: e_entry {e_entry:#x} outside the image")
    pvh_entry = None
    for blob in notes:
        off = 0
        while off + 12 <= len(blob):
            namesz, descsz, ntype = struct.unpack_from("<III", blob, off)
            name = blob[off + 12:off + 12 + namesz]
            doff = off + 12 + ((namesz + 3) & ~3)
            if name == b"Xen\0" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and descsz >= 4:
                pvh_entry = struct.unpack_from("<I", blob, doff)[0]
            off = doff + ((descsz + 3) & ~3)
    if pvh and (pvh_entry is None or not start < pvh_entry < end):
        raise BuildError(f"{path}: PVH note missing or entry outside the image")
    if not pvh and pvh_entry is not None:
        raise BuildError(f"{path}: unexpected PVH note")


def build(out_dir) -> dict[str, Path]:
    """Build (if needed) both flavours into out_dir; return {"pvh": path, "64": path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cc = _cc()
    if shutil.which(cc) is None:
        raise BuildError(f"C compiler {cc!r} not found")
    compiler_id = _compiler_id(cc)
    result: dict[str, Path] = {}
    with open(out_dir / ".microguests.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for key, (name, extra) in FLAVOURS.items():
            out = out_dir / name
            stamp = out_dir / (name + ".sha256")
            digest = _digest(compiler_id, extra)
            fresh = out.is_file() and stamp.is_file() and stamp.read_text().strip() == digest
            if not fresh:
                _compile(cc, extra, out)
                tmp = stamp.with_suffix(".tmp")
                tmp.write_text(digest + "\n")
                os.replace(tmp, stamp)
            result[key] = out
    return result


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    try:
        paths = build(out)
    except BuildError as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 1
    for key, path in paths.items():
        print(key, path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
