"""ACPI tables of a vmmd microVM (hardware-reduced ACPI, as Firecracker's).

This module owns the tables a guest with ACPI reads: the RSDP (revision 2) at ACPI_START, in
the legacy scan area, then the XSDT, FADT, MADT and DSDT, each 16-byte aligned.
- FADT revision 6.5 with HW_REDUCED_ACPI: no PM or GPE blocks, no SCI, no fixed-feature
  buttons; IA-PC boot flags: an i8042 (native/i8042.c), no VGA, no MSI, no CMOS RTC.
- MADT: a local APIC per vCPU (APIC id = index), the IOAPIC at IOAPIC_START with the MP
  table's id (vcpus + 1) and GSIs from 0, NMI on every LAPIC's LINT1.  No interrupt source
  overrides: the MP table routes ISA IRQ n to IOAPIC pin n with the bus's flags (edge, high),
  which is already ACPI's default, and Linux takes an override of IRQ 0 for the SCI's (SCI_INT
  is 0 on a hardware-reduced FADT) and would make the timer line level/low.
- DSDT: under \\_SB, the COM1 UART (PNP0501), the i8042 keyboard controller (PNP0303), each
  virtio-mmio slot in use (LNRO0005: its 4 KiB window and its IRQ, edge-triggered as irqfd
  pulses them), and optionally the VMGenID device (_CID VM_GEN_COUNTER; ADDR returns
  the id's address) with the Generic Event Device (ACPI0013) whose _EVT notifies it (0x80)
  when GED_IRQ fires.
Tables are built as one blob, written at ACPI_START; nothing in them depends on run time, so
a snapshot's copy stays right after restore.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from vmmd.record import Record
from vmmd.vm.boot import aml
from vmmd.vm.layout import (
    ACPI_END,
    ACPI_START,
    GED_IRQ,
    IOAPIC_START,
    LAPIC_START,
    VIRTIO_MMIO_SLOTS,
    VMGENID_START,
    Region,
    check_vcpu_count,
)

OEM_ID = b"VMMD  "
OEM_TABLE_ID = b"VMMDMVM "
OEM_REVISION = 1
CREATOR_ID = b"VMMD"
CREATOR_REVISION = 1

# RSDP: signature checksum oem_id revision rsdt_address length xsdt_address ext_checksum reserved
RSDP = struct.Struct("<8sB6sBIIQB3s")
RSDP_REVISION = 2  # ACPI 2.0+: has the XSDT
# Common table header: signature length revision checksum oem_id oem_table_id oem_revision
# creator_id creator_revision
HEADER = struct.Struct("<4sIBB6s8sI4sI")
TABLE_ALIGN = 16

# FADT (ACPI 6.5 table 5.9), 276 bytes: only what a hardware-reduced platform sets.
FADT_LENGTH = 276
FADT_REVISION, FADT_MINOR_REVISION = 6, 5
FADT_FLAGS_OFFSET = 112
FADT_IAPC_BOOT_ARCH_OFFSET = 109
FADT_MINOR_REVISION_OFFSET = 131
FADT_X_DSDT_OFFSET = 140
FADT_HYPERVISOR_ID_OFFSET = 268
FADT_PWR_BUTTON = 1 << 4  # no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # no fixed-feature sleep button
FADT_HW_REDUCED_ACPI = 1 << 20
IAPC_8042 = 1 << 1  # the guest may probe the i8042 (native/i8042.c)
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_PRESENT = 1 << 3
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5  # no RTC at port 0x70: Linux skips its rtc_cmos probe
HYPERVISOR_ID = b"VMMD\0\0\0\0"

# MADT (APIC) entries.
MADT_REVISION = 5
MADT_LOCAL_APIC = struct.Struct("<BBBBI")  # type length processor_uid apic_id flags
MADT_IOAPIC = struct.Struct("<BBBBII")  # type length ioapic_id reserved address gsi_base
MADT_LAPIC_NMI = struct.Struct("<BBBHB")  # type length processor_uid flags lint
MADT_TYPE_LOCAL_APIC, MADT_TYPE_IOAPIC, MADT_TYPE_LAPIC_NMI = 0, 1, 4
LAPIC_ENABLED = 1
ALL_PROCESSORS = 0xFF
NMI_LINT = 1

DSDT_REVISION = 2  # 64-bit AML integers
XSDT_REVISION = 1
FADT_SIGNATURE, MADT_SIGNATURE = b"FACP", b"APIC"

# Devices in the DSDT.
VIRTIO_MMIO_HID = "LNRO0005"  # Linux's virtio_mmio ACPI match
UART_PORT, UART_PORTS, UART_IRQ = 0x3F8, 8, 4
I8042_DATA, I8042_CMD, I8042_IRQ = 0x60, 0x64, 1
# Linux 6.1's vmgenid driver matches "VMGENCTR" or "VM_GEN_COUNTER" as a _HID or _CID.  The
# _HID is ours, a well-formed ACPI id (iasl refuses "VMGENCTR": its suffix is not hex); the
# driver binds through the _CID, as on Firecracker.
VMGENID_HID = "VMMD0001"
VMGENID_CID = "VM_GEN_COUNTER"
VMGENID_DEVICE = "\\_SB_.VGEN"
GED_HID = "ACPI0013"
VMGENID_NOTIFY = 0x80  # "the generation id changed"


class AcpiTables(Record):
    """The blob written at ACPI_START and where each table sits (signature -> region)."""

    blob: bytes
    tables: dict[str, Region]

    @property
    def rsdp(self) -> int:
        return self.tables["RSDP"].gpa


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


def build_table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A table: the common header over `body`, checksummed."""
    def header(checksum: int) -> bytes:
        return HEADER.pack(signature, HEADER.size + len(body), revision, checksum, OEM_ID,
                           OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    return header(_checksum(header(0) + body)) + body


def build_fadt(dsdt: int) -> bytes:
    body = bytearray(FADT_LENGTH - HEADER.size)
    at = -HEADER.size  # offsets below are the table's
    struct.pack_into("<H", body, at + FADT_IAPC_BOOT_ARCH_OFFSET,
                     IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_PRESENT
                     | IAPC_CMOS_RTC_NOT_PRESENT)
    struct.pack_into("<I", body, at + FADT_FLAGS_OFFSET,
                     FADT_HW_REDUCED_ACPI | FADT_PWR_BUTTON | FADT_SLP_BUTTON)
    body[at + FADT_MINOR_REVISION_OFFSET] = FADT_MINOR_REVISION
    struct.pack_into("<Q", body, at + FADT_X_DSDT_OFFSET, dsdt)
    body[at + FADT_HYPERVISOR_ID_OFFSET:at + FADT_HYPERVISOR_ID_OFFSET + 8] = HYPERVISOR_ID
    return build_table(FADT_SIGNATURE, FADT_REVISION, bytes(body))


def build_madt(vcpus: int) -> bytes:
    check_vcpu_count(vcpus)
    entries = [MADT_LOCAL_APIC.pack(MADT_TYPE_LOCAL_APIC, MADT_LOCAL_APIC.size, i, i, LAPIC_ENABLED)
               for i in range(vcpus)]
    entries.append(MADT_IOAPIC.pack(MADT_TYPE_IOAPIC, MADT_IOAPIC.size, vcpus + 1, 0,
                                    IOAPIC_START, 0))
    entries.append(MADT_LAPIC_NMI.pack(MADT_TYPE_LAPIC_NMI, MADT_LAPIC_NMI.size, ALL_PROCESSORS,
                                       0, NMI_LINT))
    # Flags 0 (no PCAT_COMPAT): a hardware-reduced guest bypasses the 8259s anyway.
    return build_table(MADT_SIGNATURE, MADT_REVISION, struct.pack("<II", LAPIC_START, 0)
                  + b"".join(entries))


def _virtio_device(index: int, window: Region, irq: int) -> bytes:
    return aml.device(
        f"V{index:03X}",
        aml.name("_HID", aml.string(VIRTIO_MMIO_HID)),
        aml.name("_UID", aml.integer(index)),
        aml.name("_CRS", aml.resource_template([
            aml.memory32_fixed(window.gpa, window.size),
            aml.interrupt(irq, edge=True),
        ])),
    )


def _legacy_devices() -> list[bytes]:
    return [
        aml.device("COM1",
                   aml.name("_HID", aml.eisa_id("PNP0501")),
                   aml.name("_UID", aml.integer(1)),
                   aml.name("_CRS", aml.resource_template([
                       aml.io(UART_PORT, UART_PORTS), aml.interrupt(UART_IRQ, edge=True)]))),
        aml.device("PS2K",
                   aml.name("_HID", aml.eisa_id("PNP0303")),
                   aml.name("_CRS", aml.resource_template([
                       aml.io(I8042_DATA, 1), aml.io(I8042_CMD, 1),
                       aml.interrupt(I8042_IRQ, edge=True)]))),
    ]


def _vmgenid_devices(vmgenid: int) -> list[bytes]:
    return [
        aml.device("VGEN",
                   aml.name("_HID", aml.string(VMGENID_HID)),
                   aml.name("_CID", aml.string(VMGENID_CID)),
                   aml.name("_DDN", aml.string(VMGENID_CID)),
                   # The id's guest physical address as (low, high) 32-bit halves.
                   aml.method("ADDR", 0, aml.return_(aml.package(
                       aml.integer(vmgenid & 0xFFFF_FFFF), aml.integer(vmgenid >> 32))))),
        aml.device("GED_",
                   aml.name("_HID", aml.string(GED_HID)),
                   aml.name("_UID", aml.integer(0)),
                   aml.name("_CRS", aml.resource_template([aml.interrupt(GED_IRQ, edge=True)])),
                   aml.method("_EVT", 1, aml.if_(
                       aml.lequal(aml.arg(0), aml.integer(GED_IRQ)),
                       aml.notify(VMGENID_DEVICE, VMGENID_NOTIFY)))),
    ]


def build_dsdt(virtio: Sequence[tuple[Region, int]], *, vmgenid: int | None) -> bytes:
    """The DSDT for these virtio-mmio slots (window, IRQ), in slot order, and the VMGenID
    device (its id at guest address `vmgenid`) with its GED, unless None."""
    if len(virtio) > VIRTIO_MMIO_SLOTS:
        raise ValueError(f"{len(virtio)} virtio-mmio devices exceed {VIRTIO_MMIO_SLOTS} slots")
    devices = _legacy_devices()
    devices += [_virtio_device(i, w, irq) for i, (w, irq) in enumerate(virtio)]
    if vmgenid is not None:
        devices += _vmgenid_devices(vmgenid)
    return build_table(b"DSDT", DSDT_REVISION, aml.scope("\\_SB_", *devices))


def _align(n: int) -> int:
    return -(-n // TABLE_ALIGN) * TABLE_ALIGN


def build_acpi(vcpus: int, virtio: Sequence[tuple[Region, int]], *,
               vmgenid: int | None = VMGENID_START) -> AcpiTables:
    """Every table, laid out from ACPI_START: RSDP, XSDT, FADT, MADT, DSDT."""
    madt, dsdt = build_madt(vcpus), build_dsdt(virtio, vmgenid=vmgenid)
    xsdt_at = ACPI_START + _align(RSDP.size)
    xsdt_len = HEADER.size + 2 * 8
    fadt_at = xsdt_at + _align(xsdt_len)
    madt_at = fadt_at + _align(FADT_LENGTH)
    dsdt_at = madt_at + _align(len(madt))
    end = dsdt_at + len(dsdt)
    if end > ACPI_END:
        raise ValueError(f"ACPI tables end at {end:#x}, past {ACPI_END:#x}")
    xsdt = build_table(b"XSDT", XSDT_REVISION, struct.pack("<QQ", fadt_at, madt_at))
    fadt = build_fadt(dsdt_at)

    def rsdp(checksum: int, ext_checksum: int) -> bytes:
        return RSDP.pack(b"RSD PTR ", checksum, OEM_ID, RSDP_REVISION, 0, RSDP.size, xsdt_at,
                         ext_checksum, b"\0\0\0")
    first20 = rsdp(0, 0)[:20]
    checksum = _checksum(first20)
    rsdp_bytes = rsdp(checksum, _checksum(rsdp(checksum, 0)))
    blob = bytearray(end - ACPI_START)
    placed = {"RSDP": (ACPI_START, rsdp_bytes), "XSDT": (xsdt_at, xsdt), "FACP": (fadt_at, fadt),
              "APIC": (madt_at, madt), "DSDT": (dsdt_at, dsdt)}
    for gpa, data in placed.values():
        blob[gpa - ACPI_START:gpa - ACPI_START + len(data)] = data
    return AcpiTables(bytes(blob), {sig: Region(gpa, len(data))
                                    for sig, (gpa, data) in placed.items()})

