"""vmmctl's network identity options (no daemon): restore's and clone's --mac
and --netns become one InterfaceOverride per interface with --net's tap,
{i} numbers each clone's taps and namespaces, and what cannot mean what
the user wants is refused before any request."""

from __future__ import annotations

import pytest
from hypothesis import given

from tests.framework.strategies import unicast_macs
from vmmd.cli import ctl
from vmmd.cli.devices import parse_net
from vmmd.client import ClientError, pb
from vmmd.spec import NetSpec


def overrides(*argv: str, i: int = 0) -> list[pb.InterfaceOverride]:
    args = ctl.build_parser().parse_args(list(argv))
    return list(ctl._overrides(args, i).network_interfaces)


def test_net_netns_and_mac_of_one_interface_merge() -> None:
    got = overrides("clone", "/s", "--count", "3", "--net", "eth0=tap{i},create",
                    "--netns", "eth0=clone-{i}", "--mac", "eth0=auto", i=2)
    assert got == [pb.InterfaceOverride(iface_id="eth0", host_dev_name="tap2", create_tap=True,
                                        netns="clone-2", guest_mac="auto")]


def test_a_bare_netns_names_every_net_tap_s_namespace() -> None:
    got = overrides("restore", "/s", "--net", "a=ta", "--net", "b=tb,create", "--netns", "ns1")
    assert [(o.iface_id, o.host_dev_name, o.netns) for o in got] == [("a", "ta", "ns1"),
                                                                     ("b", "tb", "ns1")]


@given(unicast_macs())
def test_a_mac_alone_keeps_the_snapshot_s_tap(mac: str) -> None:
    assert overrides("restore", "/s", "--mac", f"eth0={mac}") == [
        pb.InterfaceOverride(iface_id="eth0", guest_mac=mac)]
    assert overrides("clone", "/s", "--count", "1", "--mac", f"eth0={mac}") == [
        pb.InterfaceOverride(iface_id="eth0", guest_mac=mac)]


@pytest.mark.parametrize(("argv", "says"), [
    (("clone", "/s", "--count", "2", "--mac", "eth0=02:00:00:00:00:01"),
     "all 2 clones would get 02:00:00:00:00:01; give eth0=auto"),
    (("restore", "/s", "--netns", "eth0=ns1"), "give --net eth0=TAP too"),
    (("restore", "/s", "--netns", "ns1"), "give --net too"),
    (("restore", "/s", "--mac", "eth0"), "want ID=MAC"),
    (("restore", "/s", "--net", "eth0=t", "--netns", "=ns1"), "want ID=NETNS"),
])
def test_what_cannot_work_is_refused_before_the_call(argv: tuple[str, ...], says: str) -> None:
    with pytest.raises(ClientError) as e:
        overrides(*argv)
    assert e.value.code == "INVALID_ARGUMENT"
    assert says in e.value.details


def test_create_s_net_takes_a_netns() -> None:
    assert parse_net(1, "tap1,create,netns=blue,mac=02:00:00:00:00:02") == NetSpec(
        "net1", "tap1", "02:00:00:00:00:02", create_tap=True, netns="blue")
