"""Hypothesis strategies for hostile VmService requests (tests/api/test_properties.py).

Requests are drawn with *tokens* where a path goes, so that a failing example reads well:
"@name" is a file of the path zoo (`PATHS`, made by the `zoo` fixture), "%name" a snapshot
directory (`SNAP_DIRS`, made afresh for every example).  `resolve` replaces the tokens with
real paths.  Every other value is literal: the extremes below, or what hypothesis makes up.

Most requests are valid except for zero to three fields (`mutated`): a hostile value in one
field then reaches the check of that field instead of being refused at the first one.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from vmmd._proto.vmmd.v1 import vmm_pb2 as pb

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HUGE = 100_000

# ---- literal extremes ----
NASTY_TEXT = [
    "", " ", "\0", "a\0b", "a\n", "\n", "a\r", "\t", "a b", "-a", ".a", "a/b", "../a", "é",
    "\u202e", "😀", "a" * 64, "a" * 65, "a" * 4097, "x" * HUGE, "%s%n", "'\"", "\x7f", "\x01",
    "\ud7ff", "\uffff",
]
GOOD_IDS = ["a", "vm-1", "A.b_c", "0", "a" * 64]
BAD_IDS = ["a\n", "a\0", "\0", "-a", ".a", "_a", "a b", "a/b", "é", "a" * 65, "x" * HUGE, "\n",
           "a\r", " a", "a\t"]
U32 = [0, 1, 2, 16, 31, 32, 33, 64, 127, 128, 255, 256, 4096, 65535, 262143, 262144, 262145,
       2**31 - 1, 2**31, 2**32 - 1]
MEMORY_MIB = [0, 1, 15, 16, 17, 4095, 4096, 65536, 262144, 262145, 2**31, 2**32 - 1]
ENUMS = [0, 1, 2, 3, 99, -1, 2**31 - 1, -(2**31)]
BYTES = [b"", b"\0", b"\n", b"\x1b[2J", b"\xff" * 17, b"x" * 65536, bytes(range(256)) * 16,
         b"\0" * (1 << 20)]

# ---- the path zoo: "@name" -> a path (tests/api/test_properties.py builds the files) ----
PATHS = [
    # regular files
    "kernel", "kernel-pvh", "garbage", "empty", "tiny", "text", "image", "image2", "image-ro",
    # other file types
    "dir", "symlink-kernel", "symlink-image", "dangling", "loop", "self-loop", "fifo", "socket",
    # host files
    "/dev/null", "/dev/zero", "/dev/full", "/dev/urandom", "/proc/self/mem", "/proc/self/fd/0",
    "/proc/cpuinfo", "/proc/kcore", "/sys/kernel/mm/transparent_hugepage/enabled",
    "/sys/kernel", "/",
    # names
    "missing", "missing-parent", "relative", "relative-missing", "nul", "nul-only", "empty-path",
    "newline", "long-component", "long-path", "huge-path",
]
KERNELS = ["kernel", "kernel-pvh", "symlink-kernel"]
IMAGES = ["image", "image2", "symlink-image"]

# ---- snapshot directories: "%name" -> a directory made for the example ----
VALID_SNAPS = ["full", "second", "diff"]
SNAP_DIRS = [
    *VALID_SNAPS, "full-symlink", "memory-symlink-full", "missing", "missing-parent", "empty-dir",
    "file", "unrelated", "memory-dir", "vmstate-dir", "memory-dangling", "memory-loop",
    "vmstate-loop", "memory-devzero", "vmstate-devzero", "vmstate-devnull", "memory-socket",
    "vmstate-socket", "memory-truncated", "vmstate-garbage", "memory-procmem", "vmstate-procmem",
    "memory-sysfs", "vmstate-sysfs",
    "/", "/proc", "/sys", "/dev", "/proc/self/fd", "relative", "empty-path", "nul", "nul-only",
    "newline", "long-component", "long-path", "huge-path",
]
# FIFOs block an open() for ever: only test_fifo_* (own daemon) uses these.
FIFO_SNAPS = ["memory-fifo", "vmstate-fifo"]
# SnapshotVm writes into its directory: never the host's own (test_snapshot_into_root does "/").
SNAPSHOT_TARGETS = [d for d in SNAP_DIRS if d not in ("/", "/dev")]


def tok(kind: str, name: str) -> str:
    return ("@" if kind == "path" else "%") + name


def text() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(NASTY_TEXT), st.text(max_size=80))


def ids() -> st.SearchStrategy[str]:
    """vm_id-like values, valid and not."""
    return st.one_of(st.sampled_from(GOOD_IDS + BAD_IDS), st.from_regex(ID_RE, fullmatch=True),
                     text())


def paths(good: list[str] | None = None) -> st.SearchStrategy[str]:
    pool = st.sampled_from([tok("path", p) for p in PATHS])
    return st.one_of(st.sampled_from([tok("path", p) for p in good]), pool) if good else pool


def u32(pool: list[int] = U32) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(pool), st.integers(0, 2**32 - 1))


def enums() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(ENUMS), st.integers(-(2**31), 2**31 - 1))


def data() -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(BYTES), st.binary(max_size=300))


def snap_dirs(pool: list[str] = SNAP_DIRS) -> st.SearchStrategy[str]:
    return st.sampled_from([tok("snap", d) for d in pool])


# ---- mostly-valid requests ----
Field = Callable[[], st.SearchStrategy[Any]]


def _pick(draw: Any, mutated: set[str], name: str, good: st.SearchStrategy[Any],
          bad: st.SearchStrategy[Any]) -> Any:
    return draw(bad if name in mutated else good)


def _mutated(draw: Any, names: list[str]) -> set[str]:
    return set(draw(st.lists(st.sampled_from(names), max_size=3, unique=True)))


DRIVE_FIELDS = ["drive_id", "path_on_host", "read_only", "is_root_device"]
NIC_FIELDS = ["iface_id", "host_dev_name", "guest_mac", "create_tap", "netns"]
TAPS_GOOD = ["tap0", "tap1"]
TAPS_BAD = ["", "br0", "lo", "gtap", "nosuch0", "x" * 15, "x" * 16, "a/b", "tap0\n", "tap\0",
            "tap 0", "é", "x" * HUGE, "-", ".", ".."]
MACS_BAD = ["02:00:00:00:00", "02:00:00:00:00:zz", "01:00:5e:00:00:01", "00:00:00:00:00:00",
            "ff:ff:ff:ff:ff:ff", "02:00:00:00:00:01\n", "02-00-00-00-00-01", "x" * HUGE]
NETNS_MISSING = ["nosuch-ns", "y" * 255]  # good names, no such namespace
NETNS_BAD = [*NETNS_MISSING, ".", "..", "a/b", "../netns", "/", "x" * 256, "ns\0", "x" * HUGE]


def unicast_macs() -> st.SearchStrategy[str]:
    """Usable guest MACs (unicast, not all-zero), either case of hex digits."""
    octets = st.lists(st.integers(0, 255), min_size=6, max_size=6).filter(
        lambda o: not o[0] & 1 and any(o))
    return st.builds(lambda o, upper: ":".join(f"{b:02X}" if upper else f"{b:02x}" for b in o),
                     octets, st.booleans())


def bad_macs() -> st.SearchStrategy[str]:
    """Strings that are not a usable guest MAC: malformed, multicast or all-zero."""
    multicast = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(
        lambda o: ":".join(f"{b | 1 if i == 0 else b:02x}" for i, b in enumerate(o)))
    return st.one_of(st.sampled_from(MACS_BAD + ["AUTO", "auto\n"]), multicast,
                     text().filter(lambda t: t not in ("", "auto")))


@st.composite
def drives(draw: Any, good_ids: bool = True) -> pb.Drive:
    m = _mutated(draw, DRIVE_FIELDS)
    return pb.Drive(
        drive_id=_pick(draw, m, "drive_id", st.sampled_from(["d", "data", "e1"]),
                       st.one_of(st.sampled_from(BAD_IDS + NASTY_TEXT), text())),
        path_on_host=_pick(draw, m, "path_on_host", st.sampled_from([tok("path", "image-ro")]),
                           paths(IMAGES)),
        read_only=_pick(draw, m, "read_only", st.just(True), st.booleans()),
        is_root_device=draw(st.booleans()) if "is_root_device" in m else False)


@st.composite
def nics(draw: Any) -> pb.NetworkInterface:
    m = _mutated(draw, NIC_FIELDS)
    create = _pick(draw, m, "create_tap", st.just(False), st.booleans())
    return pb.NetworkInterface(
        iface_id=_pick(draw, m, "iface_id", st.sampled_from(["eth0", "n1"]),
                       st.one_of(st.sampled_from(BAD_IDS + NASTY_TEXT), text())),
        host_dev_name=_pick(draw, m, "host_dev_name",
                            st.sampled_from(["made0", "made1"] if create else TAPS_GOOD),
                            st.one_of(st.sampled_from(TAPS_GOOD + TAPS_BAD), text())),
        guest_mac=_pick(draw, m, "guest_mac", st.sampled_from(["", "02:00:00:00:00:01"]),
                        st.one_of(st.sampled_from(MACS_BAD), text())),
        create_tap=create,
        netns=_pick(draw, m, "netns", st.just(""), st.one_of(st.sampled_from(NETNS_BAD), text())))


# Cells: a name (the vm_id rule, "" = a cell of its own) and limits (each 0 = none, or
# cpu 0.01..1024, memory_mib 16..2^30, pids 8..2^22).
CELLS_GOOD = ["", "c1", "a" * 64]
CPUS = [0.0, -0.0, 0.01, 0.009999, 0.5, 1024.0, 1024.0001, -0.5, -1.0, 1e-300, 5e-324, 1e300,
        float("inf"), float("-inf"), float("nan")]
CELL_MEM_MIB = [0, 1, 15, 16, 2**30, 2**30 + 1, 2**63, 2**64 - 1]
PIDS = [0, 1, 7, 8, 2**22, 2**22 + 1, 2**32 - 1]
GOOD_LIMITS = [pb.CellLimits(), pb.CellLimits(cpu=0.5, memory_mib=256, pids=64)]
# Names a cell cannot have, and limits no cell can: (the field refused, the limits, what the
# message says after "<field>: ").  The unit tests (convert) and the api tier share them.
BAD_CELLS = ["a b", "-a", ".a", "a\n", "a/b", "\u00e9", "a" * 65, "x" * 10_000, "\0"]
BAD_LIMITS: list[tuple[str, pb.CellLimits, str]] = [
    ("cpu", pb.CellLimits(cpu=float("nan")), "nan is not a number of cores (0.01..1024.0"),
    ("cpu", pb.CellLimits(cpu=float("inf")), "inf is not a number of cores"),
    ("cpu", pb.CellLimits(cpu=float("-inf")), "-inf is not a number of cores"),
    ("cpu", pb.CellLimits(cpu=-0.5), "-0.5 is outside 0.01..1024.0 (0: no limit)"),
    ("cpu", pb.CellLimits(cpu=0.005), "0.005 is outside 0.01..1024.0"),
    ("cpu", pb.CellLimits(cpu=1025.0), "1025.0 is outside 0.01..1024.0"),
    ("cpu", pb.CellLimits(cpu=1e300), "1e+300 is outside 0.01..1024.0"),
    ("memory_mib", pb.CellLimits(memory_mib=15), "15 is outside 16..1073741824 (0: no limit)"),
    ("memory_mib", pb.CellLimits(memory_mib=2**64 - 1), f"{2**64 - 1} is outside 16.."),
    ("pids", pb.CellLimits(pids=7), "7 is outside 8..4194304 (0: no limit)"),
    ("pids", pb.CellLimits(pids=2**32 - 1), f"{2**32 - 1} is outside 8..4194304"),
    # the first bad field is the one named
    ("cpu", pb.CellLimits(cpu=-1, memory_mib=1, pids=1), "-1.0 is outside"),
    ("memory_mib", pb.CellLimits(cpu=1, memory_mib=1, pids=1), "1 is outside 16.."),
]
BAD_LIMIT_IDS = [f"{name}-{i}" for i, (name, *_) in enumerate(BAD_LIMITS)]


def cells() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(CELLS_GOOD), ids())


def limits() -> st.SearchStrategy[pb.CellLimits]:
    """Any CellLimits: extremes, and what hypothesis makes up (a double is any of them)."""
    return st.builds(pb.CellLimits,
                     cpu=st.one_of(st.sampled_from(CPUS), st.floats()),
                     memory_mib=st.one_of(st.sampled_from(CELL_MEM_MIB),
                                          st.integers(0, 2**64 - 1)),
                     pids=st.one_of(st.sampled_from(PIDS), st.integers(0, 2**32 - 1)))


def _cell_fields(draw: Any, m: set[str]) -> dict[str, Any]:
    return {"cell": _pick(draw, m, "cell", st.sampled_from(CELLS_GOOD), cells()),
            "limits": _pick(draw, m, "limits", st.sampled_from(GOOD_LIMITS), limits())}


CREATE_FIELDS = ["vm_id", "kernel_path", "initrd_path", "cmdline", "cmdline_append", "vcpus",
                 "memory_mib", "drives", "network_interfaces", "track_dirty_pages", "cell",
                 "limits", "entropy"]


@st.composite
def create_requests(draw: Any) -> pb.CreateVmRequest:
    m = _mutated(draw, CREATE_FIELDS)
    boot = pb.BootSource(
        kernel_path=_pick(draw, m, "kernel_path", st.sampled_from(
            [tok("path", k) for k in KERNELS]), paths()),
        initrd_path=_pick(draw, m, "initrd_path", st.just(""), paths(["text", "garbage"])),
        cmdline=_pick(draw, m, "cmdline", st.sampled_from(["mg=spin", ""]), text()),
        cmdline_append=_pick(draw, m, "cmdline_append", st.sampled_from(["", "x=1"]), text()))
    config = pb.VmConfig(
        boot=boot,
        vcpus=_pick(draw, m, "vcpus", st.sampled_from([0, 1, 2]), u32()),
        memory_mib=_pick(draw, m, "memory_mib", st.sampled_from([0, 16]), u32(MEMORY_MIB)),
        drives=_pick(draw, m, "drives", st.lists(drives(), max_size=1, unique_by=lambda d: d.drive_id),
                     st.lists(drives(), max_size=4)),
        network_interfaces=_pick(draw, m, "network_interfaces", st.just([]),
                                 st.lists(nics(), min_size=1, max_size=3)),
        track_dirty_pages=draw(st.booleans()), **_cell_fields(draw, m),
        entropy=_pick(draw, m, "entropy", st.sampled_from([None, pb.EntropyDevice()]),
                      st.builds(pb.EntropyDevice, max_request_bytes=st.one_of(
                          st.sampled_from([1, 65536, 65537]), u32()))))
    vm_id = _pick(draw, m, "vm_id", st.sampled_from(["", "v1"]), ids())
    return pb.CreateVmRequest(vm_id=vm_id, config=config)


@st.composite
def overrides(draw: Any) -> pb.DeviceOverrides:
    """Where a restored VM's drive "d" and interface "eth0" (the golden snapshot's) go."""
    drive = st.builds(pb.DriveOverride,
                      drive_id=st.one_of(st.just("d"), st.sampled_from(BAD_IDS), text()),
                      path_on_host=paths(["image", "image2", "image-ro", "tiny"]))
    nic = st.builds(pb.InterfaceOverride,
                    iface_id=st.one_of(st.just("eth0"), st.sampled_from(BAD_IDS), text()),
                    host_dev_name=st.one_of(st.sampled_from(TAPS_GOOD + TAPS_BAD), text()),
                    create_tap=st.booleans(),
                    guest_mac=st.one_of(st.sampled_from(["", "auto"]), unicast_macs(), bad_macs()),
                    netns=st.one_of(st.just(""), st.sampled_from(NETNS_BAD), text()))
    return pb.DeviceOverrides(drives=draw(st.lists(drive, max_size=2)),
                              network_interfaces=draw(st.lists(nic, max_size=2)))


@st.composite
def restore_requests(draw: Any) -> pb.RestoreVmRequest:
    m = _mutated(draw, ["snapshot_dir", "vm_id", "overrides", "cell", "limits"])
    return pb.RestoreVmRequest(
        snapshot_dir=_pick(draw, m, "snapshot_dir", st.just(tok("snap", "full")), snap_dirs()),
        vm_id=_pick(draw, m, "vm_id", st.sampled_from(["", "r1"]), ids()),
        resume=draw(st.booleans()),
        overrides=_pick(draw, m, "overrides", st.just(pb.DeviceOverrides()), overrides()),
        track_dirty_pages=draw(st.booleans()), **_cell_fields(draw, m),
        clock_realtime=draw(st.booleans()))


COUNTS = [0, 1, 2, 3, 1025, 2**31, 2**32 - 1]


@st.composite
def clone_requests(draw: Any) -> pb.CloneVmRequest:
    m = _mutated(draw, ["snapshot_dir", "count", "id_prefix", "overrides", "cell", "limits"])
    count = _pick(draw, m, "count", st.sampled_from([1, 2]), st.sampled_from(COUNTS))
    n = draw(st.sampled_from([0, count, count + 1, 1])) if "overrides" in m and count < 8 else 0
    return pb.CloneVmRequest(
        snapshot_dir=_pick(draw, m, "snapshot_dir", st.just(tok("snap", "full")), snap_dirs()),
        count=count,
        id_prefix=_pick(draw, m, "id_prefix", st.sampled_from(["", "c"]),
                        st.one_of(ids(), st.just("a" * 62), st.just("a" * 63))),
        resume=draw(st.booleans()),
        overrides=[draw(overrides()) for _ in range(n)],
        track_dirty_pages=draw(st.booleans()), **_cell_fields(draw, m),
        clock_realtime=draw(st.booleans()))


@st.composite
def merge_requests(draw: Any) -> pb.MergeSnapshotsRequest:
    base, diff = draw(st.one_of(st.just(("second", "diff")),
                                st.tuples(st.sampled_from(SNAP_DIRS), st.just("diff")),
                                st.tuples(st.just("second"), st.sampled_from(SNAP_DIRS)),
                                st.tuples(st.sampled_from(SNAP_DIRS), st.sampled_from(SNAP_DIRS))))
    return pb.MergeSnapshotsRequest(base_dir=tok("snap", base), diff_dir=tok("snap", diff))


# ---- kernel files ----
ELF_FIELDS = {  # name: (struct offset in the ELF header or a program header, format)
    "e_entry": (24, "<Q"), "e_phoff": (32, "<Q"), "e_phentsize": (54, "<H"), "e_phnum": (56, "<H"),
    "e_type": (16, "<H"), "e_machine": (18, "<H"), "ei_class": (4, "<B"),
}
PHDR_FIELDS = {"p_type": (0, "<I"), "p_offset": (8, "<Q"), "p_vaddr": (16, "<Q"),
               "p_paddr": (24, "<Q"), "p_filesz": (32, "<Q"), "p_memsz": (40, "<Q"),
               "p_align": (48, "<Q")}
NOTE_FIELDS = {"n_namesz": (0, "<I"), "n_descsz": (4, "<I"), "n_type": (8, "<I")}
EXTREMES = [0, 1, 3, 4, 7, 8, 0x1000, 0x100000, 0x200000, 0x3FFFFFFF, 0x40000000, 2**31,
            2**32 - 1, 2**32, 2**63, 2**64 - 1]


def elf_mutations() -> st.SearchStrategy[list[tuple[str, int, int]]]:
    """[(field, program header index or 0, value)]: applied by `mutate_elf`."""
    field = st.sampled_from([*ELF_FIELDS, *PHDR_FIELDS, *NOTE_FIELDS])
    return st.lists(st.tuples(field, st.integers(0, 1),
                              st.one_of(st.sampled_from(EXTREMES), st.integers(0, 2**64 - 1))),
                    min_size=1, max_size=3)


def mutate_elf(image: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    """The ELF (the PVH micro-guest: a PT_LOAD and a PT_NOTE) with fields overwritten."""
    buf = bytearray(image)
    phoff = struct.unpack_from("<Q", buf, 32)[0]
    notes = [struct.unpack_from("<IIQ", buf, phoff + i * 56) for i in range(2)]
    note_off = next(off for typ, _, off in notes if typ == 4)
    for name, index, value in mutations:
        if name in ELF_FIELDS:
            at, fmt = ELF_FIELDS[name]
        elif name in PHDR_FIELDS:
            at, fmt = phoff + index * 56 + PHDR_FIELDS[name][0], PHDR_FIELDS[name][1]
        else:
            at, fmt = note_off + NOTE_FIELDS[name][0], NOTE_FIELDS[name][1]
        struct.pack_into(fmt, buf, at, value % (1 << (8 * struct.calcsize(fmt))))
    return bytes(buf)


# bzImage setup header fields (offsets of Documentation/arch/x86/boot.rst) and plausible values
BZ_FIELDS = {
    "setup_sects": (0x1F1, "<B", 4), "boot_flag": (0x1FE, "<H", 0xAA55),
    "header_length": (0x201, "<B", 0x66), "header": (0x202, "<I", 0x53726448),
    "version": (0x206, "<H", 0x020F), "loadflags": (0x211, "<B", 1),
    "initrd_addr_max": (0x22C, "<I", 0x7FFFFFFF), "kernel_alignment": (0x230, "<I", 0x200000),
    "relocatable_kernel": (0x234, "<B", 1), "xloadflags": (0x236, "<H", 1),
    "cmdline_size": (0x238, "<I", 2047), "pref_address": (0x258, "<Q", 0x1000000),
    "init_size": (0x260, "<I", 0x800000),
}
BZ_SIZE = 0x21000  # room for the protected-mode part after 255 setup sectors


def bzimage(**fields: int) -> bytes:
    """A bzImage whose setup header is plausible except for `fields`; its code is zeros."""
    buf = bytearray(BZ_SIZE)
    for name, (at, fmt, value) in BZ_FIELDS.items():
        struct.pack_into(fmt, buf, at, fields.get(name, value) % (1 << (8 * struct.calcsize(fmt))))
    return bytes(buf)


def bz_mutations() -> st.SearchStrategy[dict[str, int]]:
    return st.dictionaries(st.sampled_from(list(BZ_FIELDS)),
                           st.one_of(st.sampled_from(EXTREMES), st.integers(0, 2**64 - 1)),
                           min_size=1, max_size=3)
