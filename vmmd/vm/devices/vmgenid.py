"""The VMGenID device's run-time half: its generation id in guest RAM and the notification.

The ACPI side (the VGEN device, whose ADDR names VMGENID_START, and the Generic Event Device
on GED_IRQ whose _EVT notifies VGEN) is static, in vm/boot/acpi.py.  Here: a booted VM gets a
random id; a restored or cloned one gets a new one before its vCPUs run (each clone its own,
never the snapshot's) and, once it runs, one edge on GED_IRQ, so a Linux guest's vmgenid
driver rereads the id and reseeds its RNG ("crng reseeded due to virtual machine fork").
Guest RAM is written through the VM's own methods (NativeVm.write, read, pulse_irq), which a
cell's worker serves as well.
"""

from __future__ import annotations

import os
from typing import Protocol

from vmmd.vm.layout import GED_IRQ, VMGENID_SIZE, VMGENID_START


class GenIdVm(Protocol):
    """What the device needs of a VM (NativeVm, its cell proxy, or a test's fake)."""

    def write(self, gpa: int, data: bytes) -> None: ...

    def read(self, gpa: int, length: int) -> bytes: ...

    def pulse_irq(self, gsi: int) -> None: ...


def new_id(old: bytes = b"") -> bytes:
    """A fresh random generation id, never equal to `old` (the guest compares the two)."""
    while True:
        gen_id = os.urandom(VMGENID_SIZE)
        if gen_id != old:
            return gen_id


def install(vm: GenIdVm, gen_id: bytes) -> None:
    """Put the id where the guest reads it (before its vCPUs run)."""
    if len(gen_id) != VMGENID_SIZE:
        raise ValueError(f"a generation id is {VMGENID_SIZE} bytes, not {len(gen_id)}")
    vm.write(VMGENID_START, gen_id)


def current(vm: GenIdVm) -> bytes:
    """The id in the guest's RAM now."""
    return vm.read(VMGENID_START, VMGENID_SIZE)


def notify(vm: GenIdVm) -> None:
    """Tell the guest the id changed: an edge on the GED's line (its _EVT does Notify(VGEN,
    0x80)).  A guest that has not bound the GED has the pin masked, and the edge is dropped,
    as on hardware: it reads the id when it binds the device."""
    vm.pulse_irq(GED_IRQ)
