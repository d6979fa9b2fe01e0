"""Intel MP tables: checksums, entries, and the space they must fit in."""

import struct

import pytest

from vmmd.errors import InvalidSpecError
from vmmd.vm.boot.mptable import build_mptable

START = 0x9FC00


def config_table(blob: bytes) -> bytes:
    physptr = struct.unpack_from("<I", blob, 4)[0]
    offset = physptr - START
    length = struct.unpack_from("<H", blob, offset + 4)[0]
    return blob[offset : offset + length]


def entries(table: bytes) -> list[bytes]:
    sizes = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}
    out, pos = [], 44
    while pos < len(table):
        out.append(table[pos : pos + sizes[table[pos]]])
        pos += sizes[table[pos]]
    return out


@pytest.mark.parametrize("vcpus", [1, 4, 32])
def test_checksums_and_processors(vcpus):
    blob = build_mptable(vcpus)
    assert blob[:4] == b"_MP_" and sum(blob[:16]) % 256 == 0
    assert blob[8] == 1 and blob[9] == 4  # length in paragraphs, spec rev 1.4
    table = config_table(blob)
    assert table[:4] == b"PCMP" and table[6] == 4
    assert sum(table) % 256 == 0
    assert struct.unpack_from("<I", table, 36)[0] == 0xFEE0_0000  # LAPIC address
    cpus = [e for e in entries(table) if e[0] == 0]
    assert [e[1] for e in cpus] == list(range(vcpus))  # APIC ids
    assert cpus[0][3] == 0x3 and all(e[3] == 0x1 for e in cpus[1:])  # BSP + enabled
    assert struct.unpack_from("<H", table, 34)[0] == len(entries(table))  # entry count
    assert START + len(blob) <= 0xA0000


def test_bus_ioapic_and_interrupt_routing():
    table = config_table(build_mptable(2))
    kinds = [e[0] for e in entries(table)]
    assert (
        kinds.count(1) == 1 and kinds.count(2) == 1 and kinds.count(3) == 24 and kinds.count(4) == 2
    )
    (bus,) = [e for e in entries(table) if e[0] == 1]
    assert bus[2:] == b"ISA   "
    (ioapic,) = [e for e in entries(table) if e[0] == 2]
    assert struct.unpack("<BBBBI", ioapic) == (2, 3, 0x11, 1, 0xFEC0_0000)
    irqs = [struct.unpack("<BBHBBBB", e) for e in entries(table) if e[0] == 3]
    assert [(i[4], i[5], i[6]) for i in irqs] == [(n, 3, n) for n in range(24)]
    lints = [struct.unpack("<BBHBBBB", e) for e in entries(table) if e[0] == 4]
    assert [(i[1], i[5], i[6]) for i in lints] == [(3, 0, 0), (1, 0xFF, 1)]  # ExtINT, NMI


@pytest.mark.parametrize("vcpus", [0, 33])
def test_bad_vcpu_counts_are_refused(vcpus):
    with pytest.raises(InvalidSpecError) as e:
        build_mptable(vcpus)
    assert e.value.field == "vcpus"
