"""Boot loading for x86-64 guests: kernel parsing, boot structures and guest memory setup.

The VM layer uses `vmmd.vm.boot.loader` (inspect_kernel, plan_boot, load); the other modules are
its parts: elf / bzimage (kernel formats), params (zero page, PVH start_info, memory map),
cpu (GDT, page tables, BootRegs), mptable (Intel MP tables), cmdline (kernel command line).
"""
