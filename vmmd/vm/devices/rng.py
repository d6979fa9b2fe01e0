"""The entropy device (virtio-rng): its checks, slot and command-line word.

It needs nothing on the host (the C device reads getrandom() on the VM's
I/O thread), so all there is to check is the spec's one field and that a
virtio-mmio slot is left for it: the one after the interfaces.
"""

from __future__ import annotations

from vmmd.errors import InvalidSpecError
from vmmd.record import Record
from vmmd.spec import EntropySpec
from vmmd.vm.boot.cmdline import virtio_mmio_word
from vmmd.vm.layout import virtio_mmio_slot

DEVICE_ID, QUEUES = 4, 1  # virtio-rng, as native/virtio_rng.c's ops table says
MAX_REQUEST_BYTES = 64 << 10  # VMM_RNG_MAX_REQUEST: the C device's bound


class RngPlan(Record):
    spec: EntropySpec
    mmio_base: int
    irq: int


def check_max_request(value: int) -> int:
    """max_request_bytes: 0 (the bound) or 1..MAX_REQUEST_BYTES; else ValueError
    (the API names the field, a snapshot file its own)."""
    if not 0 <= value <= MAX_REQUEST_BYTES:
        raise ValueError(f"{value} is outside 1..{MAX_REQUEST_BYTES} (0: {MAX_REQUEST_BYTES})")
    return value


def check_entropy(entropy: EntropySpec | None, first_slot: int) -> RngPlan | None:
    """The device's field and its slot (after first_slot - 1 other devices)."""
    if entropy is None:
        return None
    try:
        check_max_request(entropy.max_request_bytes)
    except ValueError as e:
        raise InvalidSpecError(("entropy", "max_request_bytes"), str(e)) from None
    try:
        region, irq = virtio_mmio_slot(first_slot)
    except ValueError:
        raise InvalidSpecError("entropy", f"at most {first_slot} devices fit this VM") from None
    return RngPlan(entropy, region.gpa, irq)


def cmdline_words(plan: RngPlan | None, *, devices: bool = True) -> list[str]:
    """The device's word, none unless `devices` (with ACPI the tables announce it)."""
    return [virtio_mmio_word(plan.mmio_base, plan.irq)] if plan is not None and devices else []
