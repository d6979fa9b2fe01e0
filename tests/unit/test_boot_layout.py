"""Guest physical map: RAM regions around the MMIO hole and machine limits."""

import pytest

from vmmd.errors import InvalidSpecError
from vmmd.vm import layout
from vmmd.vm.layout import Region, check_vcpu_count, ram_regions, virtio_mmio_slot

MiB, GiB = 1 << 20, 1 << 30


def test_small_guest_is_one_region():
    assert ram_regions(128 * MiB) == (Region(0, 128 * MiB),)


def test_three_gib_guest_still_fits_below_the_hole():
    assert ram_regions(3 * GiB) == (Region(0, 0xC000_0000),)


def test_large_guest_moves_ram_above_four_gib():
    low, high = ram_regions(5 * GiB)
    assert (low.gpa, low.end) == (0, 0xC000_0000)
    assert (high.gpa, high.size) == (0x1_0000_0000, 2 * GiB)


@pytest.mark.parametrize("size", [0, 8 * MiB, 512 * GiB, 128 * MiB + 1])
def test_bad_memory_sizes_are_refused(size):
    with pytest.raises(InvalidSpecError) as e:
        ram_regions(size)
    assert e.value.field == "memory_mib"


@pytest.mark.parametrize("vcpus", [0, 33, -1])
def test_bad_vcpu_counts_are_refused(vcpus):
    with pytest.raises(InvalidSpecError) as e:
        check_vcpu_count(vcpus)
    assert e.value.field == "vcpus"


def test_virtio_mmio_slots_start_at_0xd0000000_with_irq_5():
    assert virtio_mmio_slot(0) == (Region(0xD000_0000, 0x1000), 5)
    assert virtio_mmio_slot(1) == (Region(0xD000_1000, 0x1000), 6)
    assert virtio_mmio_slot(18)[1] == 23
    with pytest.raises(ValueError):
        virtio_mmio_slot(19)


def test_the_acpi_area_lies_in_the_bios_hole_and_the_ged_irq_is_free() -> None:
    L = layout
    assert L.LEGACY_AREA_START <= L.ACPI_START < L.ACPI_END <= L.VMGENID_START
    assert L.VMGENID_START % L.PAGE_SIZE == 0 and L.VMGENID_SIZE == 16
    assert L.VMGENID_START + L.PAGE_SIZE <= L.BIOS_AREA_END == L.HIMEM_START
    # Below the first device IRQ, and none of the legacy devices' lines (i8042 1, UART 4).
    assert L.GED_IRQ < L.IRQ_FIRST_DEVICE and L.GED_IRQ not in (0, 1, 2, 4)
    assert {virtio_mmio_slot(i)[1] for i in range(L.VIRTIO_MMIO_SLOTS)}.isdisjoint({L.GED_IRQ})
