"""ACPI tables (vm/boot/acpi.py) checked by their checksums and pointers here and by iasl's
disassembly, the loader's placing of them (zero page, PVH start_info, e820), and the VMGenID
id across boot, snapshot, restore and clone on the fake C core."""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.framework.fake_native import FakeFactory
from tests.unit.acpi_tools import disassemble, execute
from vmmd.manager import Manager
from vmmd.spec import BootSpec, DriveSpec, RestoreSpec, VmSpec
from vmmd.vm import snapshot as snapshots
from vmmd.vm.boot.acpi import AcpiTables, build_acpi
from vmmd.vm.boot.loader import inspect_kernel, load, plan_boot
from vmmd.vm.boot.params import (
    build_start_info,
    build_zero_page,
    memory_map,
    synthesized_setup_header,
)
from vmmd.vm.layout import (
    ACPI_END,
    ACPI_START,
    MAX_VCPUS,
    VIRTIO_MMIO_SLOTS,
    VMGENID_START,
    Region,
    virtio_mmio_slot,
)

MiB = 1 << 20


def slots(n: int) -> list[tuple[Region, int]]:
    return [virtio_mmio_slot(i) for i in range(n)]


def table(t: AcpiTables, sig: str) -> bytes:
    r = t.tables[sig]
    return t.blob[r.gpa - ACPI_START:r.end - ACPI_START]


def at(t: AcpiTables, gpa: int, length: int) -> bytes:
    return t.blob[gpa - ACPI_START:gpa - ACPI_START + length]


def check_structure(t: AcpiTables) -> None:
    """Checksums, lengths and the pointer chain RSDP -> XSDT -> FADT/MADT, FADT -> DSDT
    (literal offsets of ACPI 6.5 sections 5.2.5 - 5.2.9)."""
    rsdp = at(t, ACPI_START, 36)
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 2 and struct.unpack_from("<I", rsdp, 20)[0] == 36
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    xsdt_at = struct.unpack_from("<Q", rsdp, 24)[0]
    assert t.rsdp == ACPI_START and xsdt_at == t.tables["XSDT"].gpa
    for sig in ("XSDT", "FACP", "APIC", "DSDT"):
        data = table(t, sig)
        assert data[:4] == sig.encode() and struct.unpack_from("<I", data, 4)[0] == len(data)
        assert sum(data) % 256 == 0, f"{sig} checksum"
        assert t.tables[sig].gpa % 16 == 0
    xsdt = table(t, "XSDT")
    assert list(struct.unpack_from("<2Q", xsdt, 36)) == [t.tables["FACP"].gpa,
                                                         t.tables["APIC"].gpa]
    assert struct.unpack_from("<Q", table(t, "FACP"), 140)[0] == t.tables["DSDT"].gpa  # X_DSDT
    assert max(r.end for r in t.tables.values()) <= ACPI_END


def dsdt_devices(dsl: str) -> dict[str, str]:
    """Device name -> its body, from iasl's disassembly (one level of devices under \\_SB)."""
    flat = " ".join(dsl.split())
    return dict(re.findall(r"Device \((\w+)\) \{ (.*?) \} (?=Device|\} \}$)", flat))


def check_dsdt(dsl: str, virtio: Sequence[tuple[Region, int]], *, vmgenid: bool = True) -> None:
    devices = dsdt_devices(dsl)
    expected = {"COM1", "PS2K"} | {f"V{i:03X}" for i in range(len(virtio))}
    assert set(devices) == expected | ({"VGEN", "GED"} if vmgenid else set())
    assert 'EisaId ("PNP0501")' in devices["COM1"] and "0x03F8, // Range Minimum" in devices["COM1"]
    assert "{ 0x00000004, }" in devices["COM1"]
    ps2 = devices["PS2K"]
    assert 'EisaId ("PNP0303")' in ps2 and "0x0060, // Range Minimum" in ps2
    assert "0x0064, // Range Minimum" in ps2 and "{ 0x00000001, }" in ps2
    for i, (window, irq) in enumerate(virtio):
        body = devices[f"V{i:03X}"]
        assert 'Name (_HID, "LNRO0005")' in body
        assert re.search(rf"Name \(_UID, (0x{i:02X}|Zero|One)\)", body), body
        assert (f"Memory32Fixed (ReadWrite, 0x{window.gpa:08X}, // Address Base "
                f"0x{window.size:08X}, // Address Length )") in body
        assert (f"Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) "
                f"{{ 0x{irq:08X}, }}") in body


# ---- the tables alone ----
def test_tables_of_a_two_cpu_two_device_vm() -> None:
    t = build_acpi(2, slots(2))
    check_structure(t)
    assert [(s, hex(r.gpa)) for s, r in t.tables.items()][0] == ("RSDP", "0xe0000")
    check_dsdt(disassemble(table(t, "DSDT")), slots(2))


def test_fadt_is_hardware_reduced_with_the_boot_flags_of_this_machine() -> None:
    out = disassemble(table(build_acpi(1, []), "FACP"))
    fields = dict(re.findall(r"^\s*(?:\[\w+ \d+ +\d+\])?\s*([^:\n]+?) : (\S+)", out, re.M))
    assert fields["Revision"] == "06" and fields["FADT Minor Revision"] == "05"
    assert fields["Hardware Reduced (V5)"] == "1"
    assert fields["PM1A Event Block Address"] == "00000000"
    assert fields["8042 Present on ports 60/64 (V2)"] == "1"
    assert fields["VGA Not Present (V4)"] == "1"
    assert fields["CMOS RTC Not Present (V5)"] == "1"
    assert fields["Legacy Devices Supported (V2)"] == "0"
    assert fields["MSI Not Supported (V4)"] == "1"
    assert fields["Control Method Power Button (V1)"] == "1"  # no fixed-feature buttons
    assert fields["Control Method Sleep Button (V1)"] == "1"


def test_madt_has_each_cpu_the_ioapic_and_no_overrides() -> None:
    """As the MP table: APIC id = vCPU index, the IOAPIC's id vcpus + 1, NMI on LINT1.  No
    interrupt source override: identity ISA routing is ACPI's default already."""
    out = disassemble(table(build_acpi(3, []), "APIC"))
    assert re.findall(r"Local Apic ID : (\w+)", out) == ["00", "01", "02"]
    assert re.findall(r"Processor Enabled : (\d)", out) == ["1"] * 3
    assert "I/O Apic ID : 04" in out and "Address : FEC00000" in out
    assert "Interrupt : 00000000" in out  # the IOAPIC's GSI base
    assert "Local Apic Address : FEE00000" in out
    assert "Interrupt Input LINT : 01" in out
    assert "Interrupt Source Override" not in out


def test_vmgenid_and_its_generic_event_device() -> None:
    dsl = disassemble(table(build_acpi(1, []), "DSDT"))
    devices = dsdt_devices(dsl)
    vgen, ged = devices["VGEN"], devices["GED"]
    assert 'Name (_CID, "VM_GEN_COUNTER")' in vgen  # what Linux's vmgenid driver matches
    # ADDR: the id's address (low, high halves).
    assert (f"Method (ADDR, 0, NotSerialized) {{ Return (Package (0x02) {{ "
            f"0x{VMGENID_START:08X}, Zero }}) }}") in vgen
    assert 'Name (_HID, "ACPI0013"' in ged
    assert "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000003, }" in ged
    assert "Method (_EVT, 1, NotSerialized)" in ged
    assert "If ((Arg0 == 0x03)) { Notify (\\_SB.VGEN, 0x80)" in ged


def test_acpica_runs_the_vmgenid_methods() -> None:
    """ACPICA's interpreter (acpiexec, the AML engine Linux has) on the tables: ADDR gives the
    id's address; _EVT notifies VGEN with 0x80 for the GED's IRQ only."""
    t = build_acpi(2, slots(2))
    tables = {sig: table(t, sig) for sig in ("FACP", "APIC", "DSDT")}
    out = execute(tables, "evaluate \\_SB.VGEN.ADDR", "evaluate \\_SB.V001._CRS")
    assert re.search(r"\[Package\] Contains 2 Elements:\s+\[Integer\] = 00000000000FF000\s+"
                     r"\[Integer\] = 0000000000000000", out), out
    assert "86 09 00 01 00 10 00 D0 00 10 00 00 89 06 00 03" in out  # V001's window and IRQ 6
    notify = "Received a Device Notify on [VGEN]"
    fired = execute(tables, "evaluate \\_SB.GED._EVT 3")
    assert notify in fired and "Value 0x80" in fired, fired
    assert notify not in execute(tables, "evaluate \\_SB.GED._EVT 5")


def test_without_vmgenid_there_is_no_ged() -> None:
    t = build_acpi(1, slots(1), vmgenid=None)
    check_dsdt(disassemble(table(t, "DSDT")), slots(1), vmgenid=False)


def test_the_largest_machine_fits_its_area() -> None:
    t = build_acpi(MAX_VCPUS, slots(VIRTIO_MMIO_SLOTS))
    check_structure(t)
    assert ACPI_START + len(t.blob) <= ACPI_END <= VMGENID_START
    check_dsdt(disassemble(table(t, "DSDT")), slots(VIRTIO_MMIO_SLOTS))
    assert len(re.findall(r"Local Apic ID", disassemble(table(t, "APIC")))) == MAX_VCPUS


@settings(max_examples=12, deadline=None)
@given(st.integers(1, MAX_VCPUS), st.integers(0, VIRTIO_MMIO_SLOTS))
def test_any_machine_gets_sound_tables(vcpus: int, ndev: int) -> None:
    t = build_acpi(vcpus, slots(ndev))
    check_structure(t)
    check_dsdt(disassemble(table(t, "DSDT")), slots(ndev))
    madt = disassemble(table(t, "APIC"))
    assert re.findall(r"Local Apic ID : (\w+)", madt) == [f"{i:02X}" for i in range(vcpus)]
    assert f"I/O Apic ID : {vcpus + 1:02X}" in madt


# ---- where the guest is told ----
def test_boot_info_points_at_the_rsdp() -> None:
    page = build_zero_page(synthesized_setup_header(), None, (), 0xE0000)
    assert struct.unpack_from("<Q", page, 0x070)[0] == 0xE0000  # boot_params.acpi_rsdp_addr
    info = build_start_info(None, (), 0xE0000)
    assert struct.unpack_from("<Q", info, 32)[0] == 0xE0000  # hvm_start_info.rsdp_paddr
    assert struct.unpack_from("<Q", build_start_info(None, ()), 32)[0] == 0


def test_e820_reserves_the_acpi_area_only_with_acpi() -> None:
    plain = [(e.addr, e.size, int(e.type)) for e in memory_map(128 * MiB)]
    with_acpi = [(e.addr, e.size, int(e.type)) for e in memory_map(128 * MiB, acpi=True)]
    assert with_acpi == [plain[0], (0xE0000, 0x20000, 2), *plain[1:]]  # type 2: reserved


def test_loader_writes_the_tables_and_the_pointers(make_elf, write_file, opened, fake_memory):  # type: ignore[no-untyped-def]
    kernel = opened(write_file("vmlinux", make_elf(pvh_entry=0x1000000)))
    image = inspect_kernel(kernel)
    for pvh, acpi in ((False, None), (False, slots(1)), (True, slots(1))):
        mem = fake_memory(64 * MiB)
        plan = plan_boot(image, None, 64 * MiB, 2, "console=ttyS0", force_64bit=not pvh,
                         acpi=acpi)
        assert plan.pvh == pvh
        load(mem, plan, kernel)
        tables = mem.read(0xE0000, 0x1000)
        rsdp = mem.u64(0x6000 + 32) if pvh else mem.u64(0x7000 + 0x70)
        if acpi is None:
            assert tables == bytes(0x1000) and rsdp == 0
        else:
            assert tables[:8] == b"RSD PTR " and rsdp == 0xE0000
            assert tables == build_acpi(2, acpi).blob.ljust(0x1000, b"\0")[:0x1000]


# ---- the builder and the VMGenID id (fake C core) ----
def test_acpi_vm_gets_no_device_words_and_a_generation_id(manager: Manager, kernel: str,
                                                          natives: FakeFactory,
                                                          tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    drives = (DriveSpec("d", str(img), read_only=True, is_root_device=True),)
    manager.create(VmSpec("plain", BootSpec(kernel), memory_mib=32, drives=drives))
    assert "virtio_mmio.device=4K@0xd0000000:5" in manager.get("plain").cmdline
    manager.create(VmSpec("a", BootSpec(kernel), memory_mib=32, drives=drives, acpi=True))
    cmdline, fake = manager.get("a").cmdline, natives.last
    assert "virtio_mmio.device" not in cmdline and "root=/dev/vda ro" in cmdline
    gen = fake.read(VMGENID_START, 16)
    assert gen != bytes(16) and fake.read(ACPI_START, 8) == b"RSD PTR "
    assert fake.irq_pulses == []  # a booting guest reads its first id; nothing to notify


def test_each_restore_and_clone_gets_a_new_id_and_a_notification(
        manager: Manager, kernel: str, natives: FakeFactory, tmp_path: Path) -> None:
    manager.create(VmSpec("a", BootSpec(kernel), memory_mib=32, acpi=True))
    manager.start("a")
    manager.pause("a")
    original = natives.last.read(VMGENID_START, 16)
    snap = str(tmp_path / "snap")
    manager.snapshot("a", snap, diff=False)
    with snapshots.opened(snap) as (s, _):
        assert s.state.vm_generation_id == original and s.state.spec.acpi
    manager.restore(RestoreSpec(snap, "r"), resume=False)
    manager.clone([RestoreSpec(snap, f"c-{i}") for i in range(2)], resume=True)
    restored = natives.vms[-3:]
    ids = [f.read(VMGENID_START, 16) for f in restored]
    assert len({original, *ids}) == 4  # each its own, none the snapshot's
    for f in restored:
        assert f.irq_pulses == [3]  # the GED's line
        names = f.names  # after the state is in place, before the vCPUs run
        started = min(names.index(n) for n in ("start", "start_paused") if n in names)
        assert names.index("restore_legacy") < names.index("pulse_irq") < started


def test_a_snapshot_without_acpi_restores_as_before(manager: Manager, kernel: str,
                                                    natives: FakeFactory, tmp_path: Path) -> None:
    manager.create(VmSpec("a", BootSpec(kernel), memory_mib=32))
    manager.start("a")
    manager.pause("a")
    snap = str(tmp_path / "snap")
    manager.snapshot("a", snap, diff=False)
    before = natives.last.read(VMGENID_START, 16)
    manager.restore(RestoreSpec(snap, "r"), resume=False)
    r = natives.last
    assert r.read(VMGENID_START, 16) == before and "pulse_irq" not in r.names
