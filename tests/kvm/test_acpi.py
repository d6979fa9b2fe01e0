"""ACPI and VMGenID with micro-guests: the tables are in guest RAM where the boot info says,
and each restore and each clone of a snapshot gets a generation id of its own, which the guest
sees (mg=genid prints the id at 0xff000 whenever it changes), with the GED's interrupt pending
in the guest's LAPIC before its vCPUs run, in this process and through a daemon's cells."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from tests.framework.console import ConsoleReader
from tests.framework.daemon import running_daemon
from tests.kvm.test_snapshots import run_until
from vmmd.client import pb
from vmmd.native import NativeVm
from vmmd.spec import BootSpec, RestoreSpec, VmSpec
from vmmd.vm import snapshot as snapshots
from vmmd.vm.boot.acpi import build_acpi
from vmmd.vm.builder import build_vm, restore_vm
from vmmd.vm.layout import ACPI_START, GED_IRQ, VMGENID_SIZE, VMGENID_START
from vmmd.vm.vm import Vm

GENID = re.compile(rb"MG-GENID ([0-9a-f]{32})\n")
PIC_IRR = 1  # struct kvm_pic_state: last_irr, irr, imr, ...
GED_VECTOR = 0x33  # where mg=genid ged= routes the GED's pin


def lapic_irr(lapic: bytes, vector: int) -> bool:
    """Bit `vector` of the IRR in a struct kvm_lapic_state (the APIC page: IRR at 0x200, eight
    32-bit registers 16 bytes apart)."""
    word = struct.unpack_from("<I", lapic, 0x200 + vector // 32 * 0x10)[0]
    return bool(word >> (vector % 32) & 1)


def ids_printed(data: bytes) -> list[str]:
    return [m.decode() for m in GENID.findall(data)]


def console(vm: Vm) -> bytes:
    return vm.console_read(0, 1 << 16)[0]


def genid(vm: Vm) -> str:
    return vm.read_memory(VMGENID_START, VMGENID_SIZE).hex()


def test_tables_and_id_are_in_guest_ram(microguests) -> None:  # type: ignore[no-untyped-def]
    for flavour in ("pvh", "64"):
        spec = VmSpec(vm_id="a", boot=BootSpec(str(microguests[flavour]), cmdline="mg=genid"),
                      memory_mib=32, vcpus=2, acpi=True)
        with build_vm(spec) as vm:
            tables = build_acpi(2, [])
            assert vm.read_memory(ACPI_START, len(tables.blob)) == tables.blob
            info = (vm.read_memory(0x6000 + 32, 8) if flavour == "pvh"
                    else vm.read_memory(0x7000 + 0x70, 8))  # rsdp_paddr / acpi_rsdp_addr
            assert struct.unpack("<Q", info)[0] == ACPI_START
            vm.start()
            run_until(vm, lambda: ids_printed(console(vm)), "the guest prints its id")  # noqa: B023
            assert ids_printed(console(vm)) == [genid(vm)] and genid(vm) != "00" * 16


def test_each_restore_gets_a_new_id_and_the_ged_interrupt(microguests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = VmSpec(vm_id="src", boot=BootSpec(str(microguests["pvh"]),
                                             cmdline=f"mg=genid ged={GED_VECTOR:#x}"),
                  memory_mib=32, acpi=True)
    with build_vm(spec) as vm:
        vm.start()
        run_until(vm, lambda: ids_printed(console(vm)), "the guest prints its id")
        vm.pause()
        original = genid(vm)
        vm.snapshot(str(tmp_path / "s"))
    with snapshots.opened(str(tmp_path / "s")) as (snap, _):
        assert snap.state.vm_generation_id.hex() == original
        assert not snap.state.machine.pic_master[PIC_IRR] & (1 << GED_IRQ)
        assert not lapic_irr(snap.state.vcpus[0].lapic, GED_VECTOR)
    natives: list[NativeVm] = []

    def keep(kvm_path: str) -> NativeVm:
        natives.append(NativeVm(kvm_path))
        return natives[-1]

    seen = {original}
    for i in range(2):
        with restore_vm(RestoreSpec(str(tmp_path / "s"), f"r{i}"), native_factory=keep) as r:
            r.start_restored()
            new = genid(r)
            assert new not in seen
            seen.add(new)
            # The GED's edge reached the irqchip before any vCPU ran, and is not lost: the
            # guest routed the pin to its LAPIC (and runs with interrupts off, having no IDT
            # for them), so the vector waits in the LAPIC's IRR, and the 8259's request
            # stays latched; the snapshot had neither.
            assert natives[-1].save_machine().pic_master[PIC_IRR] & (1 << GED_IRQ)
            assert lapic_irr(natives[-1].save_vcpu(0).lapic, GED_VECTOR)
            r.resume()
            run_until(r, lambda: ids_printed(console(r))[-1:] == [new],  # noqa: B023
                      "the restored guest sees its new id")
            assert r.stop_info is None


def test_clones_in_cells_each_see_their_own_id(microguests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    snap = str(tmp_path / "s")
    with running_daemon() as d, d.client() as c:
        c.create("src", str(microguests["pvh"]), cmdline="mg=genid", memory_mib=32, acpi=True)
        c.start("src")
        with ConsoleReader(c, "src") as con:
            first = ids_printed(con.wait(lambda b: bool(ids_printed(b)), "the id"))[0]
        c.pause("src")
        c.snapshot("src", snap)
        clones = c.clone(snap, 2, "c", resume=True)
        seen = {first}
        for v in clones:
            with ConsoleReader(c, v.vm_id) as con:
                data = con.wait(lambda b: bool(ids_printed(b)), f"{v.vm_id}'s new id")
            new = ids_printed(data)[-1]
            assert new not in seen, f"{v.vm_id} has id {new}, seen {seen}"
            seen.add(new)
        assert all(c.get(v.vm_id).state == pb.VM_STATE_RUNNING for v in clones)
