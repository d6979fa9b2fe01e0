"""Device options shared by `vmmd run` and `vmmctl create`:
`--drive PATH[,ro][,root]` and `--net TAP[,mac=MAC][,create][,netns=NAME]`."""

from __future__ import annotations

from vmmd.errors import InvalidSpecError
from vmmd.spec import DriveSpec, NetSpec

DRIVE_HELP = "a raw disk image as virtio-blk (repeatable; vda, vdb... in order)"
NET_HELP = ("a host tap as virtio-net (repeatable; eth0, eth1... in order); "
            "create: the tap is made for the VM and removed with it; netns=NAME: the tap is "
            "in network namespace NAME (/run/netns/NAME, as `ip netns add` makes)")
ACPI_HELP = ("describe the machine with ACPI tables and a VMGenID device (the kernel needs "
             "CONFIG_ACPI; its virtio devices are announced there, not on the command line)")


def parse_drive(i: int, text: str) -> DriveSpec:
    """`PATH[,ro][,root]` -> a DriveSpec with id drive<i>."""
    path, *flags = text.split(",")
    unknown = [f for f in flags if f not in ("ro", "root")]
    if unknown:
        raise InvalidSpecError(f"drive {text!r}", f"unknown option {unknown[0]!r} (ro, root)")
    return DriveSpec(drive_id=f"drive{i}", path_on_host=path, read_only="ro" in flags,
                     is_root_device="root" in flags)


def parse_net(i: int, text: str) -> NetSpec:
    """`TAP[,mac=MAC][,create][,netns=NAME]` -> a NetSpec with id net<i>."""
    tap, *opts = text.split(",")
    mac, create, netns = None, False, ""
    for o in opts:
        if o.startswith("mac="):
            mac = o[4:]
        elif o == "create":
            create = True
        elif o.startswith("netns="):
            netns = o[6:]
        else:
            raise InvalidSpecError(f"net {text!r}", f"unknown option {o!r} (mac=, create, netns=)")
    return NetSpec(iface_id=f"net{i}", host_dev_name=tap, guest_mac=mac, create_tap=create,
                   netns=netns)
