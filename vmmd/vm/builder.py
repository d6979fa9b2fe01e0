"""Construction order of a VM, in one place (as Firecracker's builder).

check everything (kernel, initrd, memory, vCPUs, cmdline) -> create the KVM
VM -> RAM -> vCPUs -> load the guest -> boot registers.  Everything that can
be refused is refused before the KVM VM exists; a failure after that closes
what was made, so nothing half-created is left behind.
"""

from __future__ import annotations

from vmmd.native import NativeVm
from vmmd.spec import VmSpec
from vmmd.vm.boot.cmdline import append_words
from vmmd.vm.boot.loader import BootPlan, inspect_initrd, inspect_kernel, load, plan_boot
from vmmd.vm.devices import block
from vmmd.vm.vm import Vm


def plan(spec: VmSpec, *, force_64bit: bool = False) -> tuple[BootPlan, tuple[block.DrivePlan, ...]]:
    """Validate a spec against its files; raises InvalidSpecError naming the field.
    The command line gains the words that announce the devices."""
    drives = block.check_drives(spec.drives)
    cmdline = append_words(spec.cmdline, *block.cmdline_words(drives, spec.cmdline))
    kernel = inspect_kernel(spec.kernel)
    initrd_size = inspect_initrd(spec.initrd) if spec.initrd else None
    boot = plan_boot(kernel, initrd_size, spec.mem_bytes, spec.vcpus, cmdline,
                     force_64bit=force_64bit)
    return boot, drives


def build_vm(spec: VmSpec, *, kvm_path: str = "/dev/kvm", force_64bit: bool = False) -> Vm:
    boot, drives = plan(spec, force_64bit=force_64bit)
    locks = block.DriveLocks()
    locks.acquire(drives)
    native = None
    try:
        native = NativeVm(kvm_path)
        for region in boot.ram:
            native.add_ram(region.gpa, region.size)
        for d in drives:
            native.add_virtio_blk(d.spec.path, read_only=d.spec.read_only,
                                  serial=block.serial(d.spec.drive_id),
                                  mmio_base=d.mmio_base, gsi=d.irq)
        native.create_vcpus(spec.vcpus)
        regs = load(native, boot, spec.kernel, spec.initrd)
        native.set_boot_regs(0, regs)
    except BaseException:
        if native is not None:
            native.close()
        locks.close()
        raise
    return Vm(spec, native, cmdline=boot.cmdline.rstrip(b"\0").decode(), resources=[locks])
