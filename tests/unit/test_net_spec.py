"""Network interface specs: validation, generated MACs, slots, cmdline words."""

from __future__ import annotations

import pytest

from vmmd.cli.devices import parse_net
from vmmd.errors import InvalidSpecError
from vmmd.spec import NetSpec
from vmmd.vm.devices.net import check_nets, cmdline_words, generated_mac, parse_mac


def test_interfaces_take_the_slots_after_the_drives() -> None:
    plans = check_nets((NetSpec("a", "tap0"), NetSpec("b", "tap1")), "vm", first_slot=2)
    assert [(p.mmio_base, p.irq) for p in plans] == [(0xD0002000, 7), (0xD0003000, 8)]
    assert cmdline_words(plans) == ["virtio_mmio.device=4K@0xd0002000:7",
                                    "virtio_mmio.device=4K@0xd0003000:8"]


def test_given_mac_is_kept_and_normalised() -> None:
    (p,) = check_nets((NetSpec("a", "tap0", "02:AB:cd:00:00:01"),), "vm", 0)
    assert p.mac == bytes.fromhex("02abcd000001")
    assert p.spec.guest_mac == "02:ab:cd:00:00:01"


def test_generated_mac_depends_on_vm_and_interface_only() -> None:
    a = generated_mac("vm1", "eth0")
    assert a == generated_mac("vm1", "eth0")
    assert len({a, generated_mac("vm2", "eth0"), generated_mac("vm1", "eth1")}) == 3
    assert a[0] == 0x06  # locally administered, unicast
    (p,) = check_nets((NetSpec("eth0", "tap0"),), "vm1", 0)
    assert p.mac == a


@pytest.mark.parametrize("text", ["", "02:00:00:00:00", "02-00-00-00-00-01", "0200000000001",
                                  "02:00:00:00:00:0g", "02:00:00:00:00:001"])
def test_malformed_macs(text: str) -> None:
    with pytest.raises(InvalidSpecError, match="is not a MAC address"):
        parse_mac(text, "mac")


def test_parse_net_options() -> None:
    assert parse_net(3, "tap9,mac=02:00:00:00:00:09,create") == NetSpec(
        "net3", "tap9", "02:00:00:00:00:09", True)
    assert parse_net(0, "tap0") == NetSpec("net0", "tap0")
    with pytest.raises(InvalidSpecError, match="unknown option 'x'"):
        parse_net(0, "tap0,x")
