"""Intel MultiProcessor Specification 1.4 tables, as Firecracker's mptable.rs writes them.

This module owns the MP floating pointer and configuration table that tell the guest its CPUs
and interrupt routing: one processor entry per vCPU (APIC id = index, BSP = 0), an ISA bus,
the IOAPIC, IRQs 0..23 routed to IOAPIC pins 0..23 (KVM's default routing) and the local
ExtINT→LINT0 / NMI→LINT1 lines.  The IOAPIC id is vcpus + 1, as in Firecracker: above every
CPU's APIC id.  Everything fits in the EBDA page at MPTABLE_START, below 0xA0000.
"""

from __future__ import annotations

import struct

from vmmd.vm.layout import (
    IOAPIC_PINS,
    IOAPIC_START,
    LAPIC_START,
    LEGACY_AREA_START,
    MAX_VCPUS,
    MPTABLE_START,
    check_vcpu_count,
)

# Linux's arch/x86/include/asm/mpspec_def.h structures, little-endian and packed.
# mpf_intel: signature physptr length specification checksum feature1..feature5
MPF_INTEL = struct.Struct("<4sIBBBBBBBB")
# mpc_table: signature length spec checksum oem productid oemptr oemsize oemcount lapic
#            ext_table_length ext_table_checksum reserved
MPC_TABLE = struct.Struct("<4sHBB8s12sIHHIHBB")
# mpc_cpu: type apicid apicver cpuflag cpufeature featureflag reserved[2]
MPC_CPU = struct.Struct("<BBBBIIII")
MPC_BUS = struct.Struct("<BB6s")  # type busid bustype
MPC_IOAPIC = struct.Struct("<BBBBI")  # type apicid apicver flags apicaddr
# mpc_intsrc / mpc_lintsrc: type irqtype irqflag srcbus srcbusirq dstapic dstirq
MPC_IRQ = struct.Struct("<BBHBBBB")

SMP_MAGIC = b"_MP_"
MPC_SIGNATURE = b"PCMP"
MP_SPEC_REV = 4  # MP spec 1.4
MPC_OEM = b"VMMD    "
MPC_PRODUCT_ID = b"MICROVM     "
BUS_TYPE_ISA = b"ISA   "
MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4
CPU_ENABLED, CPU_BOOTPROCESSOR = 0x01, 0x02
MPC_APIC_USABLE = 0x01
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3
MP_IRQPOL_DEFAULT = 0
LAPIC_VERSION = 0x14  # what KVM's LAPIC reports
IOAPIC_VERSION = 0x11  # what KVM's IOAPIC reports
CPU_SIGNATURE = 0x600  # family 6
CPU_FEATURES = 0x201  # CPUID.1:EDX APIC | FPU
ALL_LAPICS = 0xFF
ISA_BUS_ID = 0


def mptable_size(vcpus: int) -> int:
    """Bytes of the floating pointer plus the configuration table for `vcpus` CPUs."""
    irq_entries = IOAPIC_PINS + 2
    return (
        MPF_INTEL.size + MPC_TABLE.size + vcpus * MPC_CPU.size + MPC_BUS.size + MPC_IOAPIC.size
        + irq_entries * MPC_IRQ.size
    )  # fmt: skip


def _checksum(data: bytes) -> int:
    """The byte that makes `data` plus it sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _entries(vcpus: int) -> list[bytes]:
    ioapic_id = vcpus + 1
    cpus = [
        MPC_CPU.pack(MP_PROCESSOR, i, LAPIC_VERSION, CPU_ENABLED | (CPU_BOOTPROCESSOR if i == 0 else 0),
                     CPU_SIGNATURE, CPU_FEATURES, 0, 0)
        for i in range(vcpus)
    ]  # fmt: skip
    bus = MPC_BUS.pack(MP_BUS, ISA_BUS_ID, BUS_TYPE_ISA)
    ioapic = MPC_IOAPIC.pack(MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE, IOAPIC_START)
    irqs = [
        MPC_IRQ.pack(MP_INTSRC, MP_INT, MP_IRQPOL_DEFAULT, ISA_BUS_ID, irq, ioapic_id, irq)
        for irq in range(IOAPIC_PINS)
    ]
    lints = [
        MPC_IRQ.pack(MP_LINTSRC, MP_EXTINT, MP_IRQPOL_DEFAULT, ISA_BUS_ID, 0, 0, 0),
        MPC_IRQ.pack(MP_LINTSRC, MP_NMI, MP_IRQPOL_DEFAULT, ISA_BUS_ID, 0, ALL_LAPICS, 1),
    ]
    return [*cpus, bus, ioapic, *irqs, *lints]


def build_mptable(vcpus: int) -> bytes:
    """The MP floating pointer followed by the configuration table, to write at MPTABLE_START."""
    check_vcpu_count(vcpus)
    entries = _entries(vcpus)
    body = b"".join(entries)
    length = MPC_TABLE.size + len(body)

    def config(checksum: int) -> bytes:
        return MPC_TABLE.pack(MPC_SIGNATURE, length, MP_SPEC_REV, checksum, MPC_OEM, MPC_PRODUCT_ID,
                              0, 0, len(entries), LAPIC_START, 0, 0, 0)  # fmt: skip

    table = config(_checksum(config(0) + body)) + body
    config_addr = MPTABLE_START + MPF_INTEL.size

    def floating(checksum: int) -> bytes:
        return MPF_INTEL.pack(SMP_MAGIC, config_addr, 1, MP_SPEC_REV, checksum, 0, 0, 0, 0, 0)

    blob = floating(_checksum(floating(0))) + table
    assert len(blob) == mptable_size(vcpus)
    return blob


# The largest table must end below the legacy VGA/BIOS area.
assert MPTABLE_START + mptable_size(MAX_VCPUS) <= LEGACY_AREA_START
