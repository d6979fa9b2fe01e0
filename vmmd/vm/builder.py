"""Construction order of a VM, in one place (as Firecracker's builder).

check everything (kernel, initrd, memory, vCPUs, cmdline) -> create the KVM
VM -> RAM -> vCPUs -> load the guest -> boot registers.  Everything that can
be refused is refused before the KVM VM exists; a failure after that closes
what was made, so nothing half-created is left behind.
"""

from __future__ import annotations

from vmmd.native import NativeVm
from vmmd.spec import VmSpec
from vmmd.vm.boot.loader import BootPlan, inspect_initrd, inspect_kernel, load, plan_boot
from vmmd.vm.vm import Vm


def plan(spec: VmSpec, *, force_64bit: bool = False) -> BootPlan:
    """Validate a spec against its files; raises InvalidSpecError naming the field."""
    kernel = inspect_kernel(spec.kernel)
    initrd_size = inspect_initrd(spec.initrd) if spec.initrd else None
    return plan_boot(kernel, initrd_size, spec.mem_bytes, spec.vcpus, spec.cmdline,
                     force_64bit=force_64bit)


def build_vm(spec: VmSpec, *, kvm_path: str = "/dev/kvm", force_64bit: bool = False) -> Vm:
    boot = plan(spec, force_64bit=force_64bit)
    native = NativeVm(kvm_path)
    try:
        for region in boot.ram:
            native.add_ram(region.gpa, region.size)
        native.create_vcpus(spec.vcpus)
        regs = load(native, boot, spec.kernel, spec.initrd)
        native.set_boot_regs(0, regs)
    except BaseException:
        native.close()
        raise
    return Vm(spec, native)
