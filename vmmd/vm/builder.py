"""Construction order of a VM, in one place (as Firecracker's builder).

check everything (kernel, initrd, memory, vCPUs, cmdline) -> create the KVM
VM -> RAM -> vCPUs -> load the guest -> boot registers.  Everything that can
be refused is refused before the KVM VM exists; a failure after that closes
what was made, so nothing half-created is left behind.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vmmd.native import NativeVm
from vmmd.spec import VmSpec
from vmmd.vm.boot.cmdline import append_words
from vmmd.vm.boot.loader import BootPlan, inspect_initrd, inspect_kernel, load, plan_boot
from vmmd.vm.devices import block, net
from vmmd.vm.vm import Vm


@dataclass(frozen=True)
class Plan:
    spec: VmSpec  # as the VM gets it: generated values (MACs) filled in
    boot: BootPlan
    drives: tuple[block.DrivePlan, ...]
    nets: tuple[net.NetPlan, ...]


def plan(spec: VmSpec, *, force_64bit: bool = False) -> Plan:
    """Validate a spec against its files; raises InvalidSpecError naming the field.
    The command line gains the words that announce the devices."""
    drives = block.check_drives(spec.drives)
    nets = net.check_nets(spec.nets, spec.vm_id, first_slot=len(drives))
    cmdline = append_words(spec.cmdline, *block.cmdline_words(drives, spec.cmdline),
                           *net.cmdline_words(nets))
    kernel = inspect_kernel(spec.kernel)
    initrd_size = inspect_initrd(spec.initrd) if spec.initrd else None
    boot = plan_boot(kernel, initrd_size, spec.mem_bytes, spec.vcpus, cmdline,
                     force_64bit=force_64bit)
    spec = dataclasses.replace(spec, nets=tuple(n.spec for n in nets))
    return Plan(spec, boot, drives, nets)


def build_vm(spec: VmSpec, *, kvm_path: str = "/dev/kvm", force_64bit: bool = False) -> Vm:
    p = plan(spec, force_64bit=force_64bit)
    locks, taps = block.DriveLocks(), net.Taps()
    native = None
    try:
        locks.acquire(p.drives)
        tap_fds = taps.open(p.nets)
        native = NativeVm(kvm_path)
        for region in p.boot.ram:
            native.add_ram(region.gpa, region.size)
        for d in p.drives:
            native.add_virtio_blk(d.spec.path, read_only=d.spec.read_only,
                                  serial=block.serial(d.spec.drive_id),
                                  mmio_base=d.mmio_base, gsi=d.irq)
        for n, tap in zip(p.nets, tap_fds):
            native.add_virtio_net(tap.fd, mac=n.mac, max_frame=tap.max_frame,
                                  mmio_base=n.mmio_base, gsi=n.irq)
        native.create_vcpus(spec.vcpus)
        regs = load(native, p.boot, spec.kernel, spec.initrd)
        native.set_boot_regs(0, regs)
    except BaseException:
        if native is not None:
            native.close()  # before the taps: the device uses their fds until then
        taps.close()
        locks.close()
        raise
    return Vm(p.spec, native, cmdline=p.boot.cmdline.rstrip(b"\0").decode(),
              resources=[locks, taps])
