"""A small ACPI Machine Language encoder: just what vmmd's DSDT needs.

This module owns the AML byte encoding (ACPI 6.5 chapter 20): package lengths, name strings,
data objects (Integer, String, Buffer, Package, EisaId), the named objects and statements the
DSDT uses (Scope, Device, Name, Method, Return, If, LEqual, Notify, Arg0..6) and resource
templates (IO, Memory32Fixed, extended Interrupt).  Every builder returns the bytes of one AML
term; terms nest by passing bytes in.  acpi.py composes them into tables.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

# Opcodes (ACPI 6.5 section 20.3).
ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP, METHOD_OP = 0x08, 0x10, 0x11, 0x12, 0x14
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
ARG0_OP = 0x68
NOTIFY_OP, LEQUAL_OP, IF_OP, RETURN_OP = 0x86, 0x93, 0xA0, 0xA4
DUAL_NAME_PREFIX, MULTI_NAME_PREFIX, ROOT_CHAR, PARENT_PREFIX = 0x2E, 0x2F, 0x5C, 0x5E

# Resource descriptors (ACPI 6.5 section 6.4).
IO_DESCRIPTOR = 0x47  # small item 0x08, 7 bytes
END_TAG = 0x79  # small item 0x0F, 1 byte
MEMORY32_FIXED = 0x86
EXTENDED_INTERRUPT = 0x89

MAX_PKG_LENGTH = (1 << 28) - 1
ONES = (1 << 64) - 1


def pkg_length(body_len: int) -> bytes:
    """PkgLength for `body_len` bytes that follow it; the encoded length counts itself too."""
    for extra in range(4):
        total = body_len + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            lead = extra << 6 | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"AML package of {body_len} bytes exceeds {MAX_PKG_LENGTH}")


def _pkg(body: bytes) -> bytes:
    return pkg_length(len(body)) + body


def _seg(seg: str) -> bytes:
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_") or not all(
            c.isupper() or c.isdigit() or c == "_" for c in seg):
        raise ValueError(f"bad AML name segment {seg!r}")
    return seg.ljust(4, "_").encode()


def name_string(name: str) -> bytes:
    r"""A NameString: optional root (\) or parent (^...) prefix, then dot-separated segments
    (each padded to 4 characters with "_")."""
    prefix = b""
    if name.startswith("\\"):
        prefix, name = b"\\", name[1:]
    else:
        while name.startswith("^"):
            prefix, name = prefix + b"^", name[1:]
    segs = [_seg(s) for s in name.split(".")] if name else []
    if not segs:
        return prefix + b"\x00"
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + segs[0] + segs[1]
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# ---- data objects ----
def integer(value: int) -> bytes:
    """The shortest encoding of a 64-bit integer constant."""
    if not 0 <= value <= ONES:
        raise ValueError(f"AML integer {value} is outside 0..2^64-1")
    if value in (0, 1):
        return bytes([ZERO_OP if value == 0 else ONE_OP])
    if value == ONES:
        return bytes([ONES_OP])
    for prefix, fmt in ((BYTE_PREFIX, "<B"), (WORD_PREFIX, "<H"), (DWORD_PREFIX, "<I")):
        if value < 1 << (8 * struct.calcsize(fmt)):
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(s: str) -> bytes:
    data = s.encode("ascii")
    if b"\x00" in data:
        raise ValueError("AML strings cannot hold NUL")
    return bytes([STRING_PREFIX]) + data + b"\x00"


def eisa_id(pnp: str) -> bytes:
    """EisaId("PNP0501"): three letters (5 bits each) and four hex digits, as a big-endian
    DWord stored as an AML integer."""
    if len(pnp) != 7 or not pnp[:3].isalpha() or not pnp[:3].isupper():
        raise ValueError(f"bad EISA id {pnp!r}")
    product = int(pnp[3:], 16)
    letters = [ord(c) - 0x40 for c in pnp[:3]]
    value = letters[0] << 26 | letters[1] << 21 | letters[2] << 16 | product
    return integer(int.from_bytes(value.to_bytes(4, "big"), "little"))


def buffer(data: bytes) -> bytes:
    return bytes([BUFFER_OP]) + _pkg(integer(len(data)) + data)


def package(*elements: bytes) -> bytes:
    if len(elements) > 255:
        raise ValueError("a Package holds at most 255 elements")
    return bytes([PACKAGE_OP]) + _pkg(bytes([len(elements)]) + b"".join(elements))


# ---- named objects and statements ----
def name(n: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + name_string(n) + value


def scope(n: str, *terms: bytes) -> bytes:
    return bytes([SCOPE_OP]) + _pkg(name_string(n) + b"".join(terms))


def device(n: str, *terms: bytes) -> bytes:
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + _pkg(name_string(n) + b"".join(terms))


def method(n: str, args: int, *terms: bytes, serialized: bool = False) -> bytes:
    if not 0 <= args <= 7:
        raise ValueError(f"a method takes 0..7 arguments, not {args}")
    flags = args | (0x08 if serialized else 0)
    return bytes([METHOD_OP]) + _pkg(name_string(n) + bytes([flags]) + b"".join(terms))


def arg(i: int) -> bytes:
    if not 0 <= i <= 6:
        raise ValueError(f"Arg{i} does not exist")
    return bytes([ARG0_OP + i])


def return_(value: bytes) -> bytes:
    return bytes([RETURN_OP]) + value


def if_(predicate: bytes, *terms: bytes) -> bytes:
    return bytes([IF_OP]) + _pkg(predicate + b"".join(terms))


def lequal(a: bytes, b: bytes) -> bytes:
    return bytes([LEQUAL_OP]) + a + b


def notify(target: str, value: int) -> bytes:
    return bytes([NOTIFY_OP]) + name_string(target) + integer(value)


# ---- resource templates ----
def io(port: int, length: int) -> bytes:
    """IO (Decode16, port, port, 1, length): a fixed range of I/O ports."""
    return struct.pack("<BBHHBB", IO_DESCRIPTOR, 0x01, port, port, 1, length)


def memory32_fixed(base: int, length: int, *, writable: bool = True) -> bytes:
    return struct.pack("<BHBII", MEMORY32_FIXED, 9, int(writable), base, length)


def interrupt(irq: int, *, edge: bool, active_low: bool = False, shared: bool = False) -> bytes:
    """Interrupt (ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) {irq}."""
    flags = 0x01 | (0x02 if edge else 0) | (0x04 if active_low else 0) | (0x08 if shared else 0)
    return struct.pack("<BHBBI", EXTENDED_INTERRUPT, 6, flags, 1, irq)


def resource_template(descriptors: Iterable[bytes]) -> bytes:
    """ResourceTemplate () {...}: a Buffer of the descriptors and an end tag (checksum 0:
    "treat as correct", what iasl writes)."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))
