"""Guest physical memory map of an x86-64 microVM.

This module owns every fixed guest physical address and the machine limits (memory, vCPUs):
nothing else in vmmd spells a guest address as a number.  The map follows Firecracker's:

    0x0000_0500  GDT (4 entries)            0x0000_0520  IDT (one null entry)
    0x0000_6000  PVH hvm_start_info, then its module list and memory map
    0x0000_7000  zero page (struct boot_params) for the Linux 64-bit boot protocol
    0x0000_8ff0  boot stack top             0x0000_9000  PML4, PDPT at 0xa000, PD at 0xb000
    0x0002_0000  kernel command line (COMMAND_LINE_SIZE bytes incl. NUL)
    0x0009_fc00  Intel MP table (in the EBDA; low RAM in the e820 map ends here)
    0x000e_0000  ACPI tables (RSDP first: the legacy scan area), up to 0xf_f000 (VMs with ACPI)
    0x000f_f000  VMGenID page: the 16-byte generation id (VMs with ACPI)
    0x0010_0000  HIMEM: kernels load here or above; RAM up to min(end, 3 GiB)
    0xc000_0000  32-bit MMIO hole up to 4 GiB: virtio-mmio slots from 0xd000_0000, IOAPIC, LAPIC
    0x1_0000_0000  RAM beyond 3 GiB continues here
"""

from __future__ import annotations

from vmmd.errors import InvalidSpecError
from vmmd.record import Record

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4 * KiB

# Boot structures in the first MiB.
GDT_START = 0x500
IDT_START = 0x520
PVH_INFO_START = 0x6000
PVH_MODLIST_START = 0x6040
PVH_MEMMAP_START = 0x6080
ZERO_PAGE_START = 0x7000
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PDPT_START = 0xA000
PD_START = 0xB000
IDENTITY_MAP_END = 1 * GiB  # the boot page tables identity-map [0, 1 GiB) with 2 MiB pages
CMDLINE_START = 0x20000
COMMAND_LINE_SIZE = 2048  # Linux x86 COMMAND_LINE_SIZE, terminating NUL included
MPTABLE_START = 0x9FC00
EBDA_START = 0x9FC00  # low RAM (e820 type 1) is [0, EBDA_START)
LEGACY_AREA_START = 0xA0000  # VGA/BIOS area: boot structures must end below it
# ACPI lives where a PC's BIOS keeps it: the RSDP at the start of the area Linux scans for it
# (0xE0000-0xFFFFF), the other tables after it, and the VMGenID page last.  The area is RAM
# in the VM's memory slot (so snapshots carry it) but never RAM in the e820 map: with ACPI on
# the map marks all of it reserved, so the guest keeps off the tables and the generation id.
ACPI_START = 0xE0000
VMGENID_START = 0xFF000
VMGENID_SIZE = 16  # the id; the rest of its page stays zero
ACPI_END = VMGENID_START  # the tables must end here
BIOS_AREA_END = 0x100000  # end of the reserved range (= HIMEM_START)
HIMEM_START = 0x100000

# The 32-bit MMIO hole and what lives in it.
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000
VIRTIO_MMIO_START = 0xD000_0000
VIRTIO_MMIO_SLOT_SIZE = 4 * KiB
IOAPIC_START = 0xFEC0_0000
LAPIC_START = 0xFEE0_0000

# Interrupt lines: the IOAPIC has 24 pins; legacy devices use 0..4 (i8042 on 1, UART on 4).
# The ACPI Generic Event Device (VMGenID's notification) takes COM2's ISA line 3, which no
# device of ours uses: every pin from 5 up stays a virtio-mmio slot's, so device IRQs (and
# snapshots) are the same with ACPI on or off.
GED_IRQ = 3
IOAPIC_PINS = 24
IRQ_MAX = IOAPIC_PINS - 1
IRQ_FIRST_DEVICE = 5
VIRTIO_MMIO_SLOTS = IRQ_MAX - IRQ_FIRST_DEVICE + 1

# Machine limits.
MIN_MEM_BYTES = 16 * MiB
MAX_MEM_BYTES = 256 * GiB
MAX_VCPUS = 32


class Region(Record):
    """A guest physical range [gpa, gpa + size)."""

    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def check_memory_size(mem_bytes: int) -> None:
    """Refuse a guest RAM size outside the limits or not a whole number of pages."""
    if not MIN_MEM_BYTES <= mem_bytes <= MAX_MEM_BYTES:
        raise InvalidSpecError(
            "memory_mib",
            f"{mem_bytes} bytes is outside {MIN_MEM_BYTES // MiB} MiB..{MAX_MEM_BYTES // GiB} GiB",
        )
    if mem_bytes % PAGE_SIZE:
        raise InvalidSpecError("memory_mib", f"{mem_bytes} bytes is not a multiple of {PAGE_SIZE}")


def check_vcpu_count(vcpus: int) -> None:
    """Refuse a vCPU count outside 1..MAX_VCPUS."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise InvalidSpecError("vcpus", f"{vcpus} is outside 1..{MAX_VCPUS}")


def ram_regions(mem_bytes: int) -> tuple[Region, ...]:
    """Guest RAM as KVM memory regions: RAM above the MMIO hole start moves to 4 GiB."""
    check_memory_size(mem_bytes)
    if mem_bytes <= MMIO_HOLE_START:
        return (Region(0, mem_bytes),)
    return (Region(0, MMIO_HOLE_START), Region(MMIO_HOLE_END, mem_bytes - MMIO_HOLE_START))


def low_ram_end(mem_bytes: int) -> int:
    """End of the RAM below the MMIO hole (where the initrd goes)."""
    return min(mem_bytes, MMIO_HOLE_START)


def virtio_mmio_slot(index: int) -> tuple[Region, int]:
    """The MMIO window and IRQ of virtio-mmio slot `index` (0-based)."""
    if not 0 <= index < VIRTIO_MMIO_SLOTS:
        raise ValueError(f"virtio-mmio slot {index} outside 0..{VIRTIO_MMIO_SLOTS - 1}")
    base = VIRTIO_MMIO_START + index * VIRTIO_MMIO_SLOT_SIZE
    return Region(base, VIRTIO_MMIO_SLOT_SIZE), IRQ_FIRST_DEVICE + index
