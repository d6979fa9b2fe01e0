"""virtio-rng (the entropy device) under KVM with the micro-guest's minimal
driver: the guest gets random bytes (different each time, not all zero),
a request is cut at the configured bound, and two clones of one snapshot
get different bytes from then on (the host's getrandom(), not the
snapshot's memory).  The clones run in a daemon of the default isolation
(cells: the device runs in the jailed worker, under its seccomp filter)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.framework.console import ConsoleReader
from tests.framework.daemon import running_daemon
from tests.framework.guestrun import run_guest
from vmmd.client import pb
from vmmd.native import StopReason
from vmmd.spec import EntropySpec

ROUND = re.compile(rb"^MG-RNG (\d+) len=(\d+) sum=([0-9a-f]{8}) zero=([01])$", re.MULTILINE)


def rounds(console: bytes) -> dict[int, tuple[int, str, bool]]:
    """round -> (used length, FNV-1a of the bytes, all zero)."""
    return {int(m[1]): (int(m[2]), m[3].decode(), m[4] == b"1") for m in ROUND.finditer(console)}


def rng(kernel: Path, words: str, max_request: int = 0):  # type: ignore[no-untyped-def]
    run = run_guest(kernel, f"mg=rng {words}", entropy=EntropySpec(max_request))
    assert run.stop.reason == StopReason.RESET, run.console
    assert "MG-ERROR" not in run.console and run.console.endswith("MG-DONE\n"), run.console
    return run


def test_the_guest_gets_random_bytes(microguests) -> None:  # type: ignore[no-untyped-def]
    run = rng(microguests["pvh"], "n=3 size=4096")
    got = rounds(run.console.encode())
    assert sorted(got) == [0, 1, 2]
    assert all(n == 4096 and not zero for n, _, zero in got.values()), run.console
    assert len({s for _, s, _ in got.values()}) == 3
    assert "MG-RNG-CHECK ok" in run.console


def test_a_request_gets_at_most_the_bound(microguests) -> None:  # type: ignore[no-untyped-def]
    run = rng(microguests["64"], "n=2 size=4096 evidx=1", max_request=1000)
    assert [n for n, _, _ in rounds(run.console.encode()).values()] == [1000, 1000]
    run = rng(microguests["pvh"], "n=1 size=131072")  # the device's own bound, 64 KiB
    assert [n for n, _, _ in rounds(run.console.encode()).values()] == [65536]


def test_without_the_device_the_guest_finds_none(microguests) -> None:  # type: ignore[no-untyped-def]
    run = run_guest(microguests["pvh"], "mg=rng n=1")
    assert "MG-ERROR rng: no virtio entropy device" in run.console


def test_clones_of_one_snapshot_get_different_bytes(microguests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    snap = str(tmp_path / "s")
    with running_daemon() as d, d.client() as c:
        c.create("src", str(microguests["pvh"]), cmdline="mg=rng n=0 ms=20 size=256",
                 memory_mib=32, entropy=pb.EntropyDevice())
        assert c.get("src").config.HasField("entropy")
        c.start("src")
        with ConsoleReader(c, "src") as con:
            con.wait(lambda b: 2 in rounds(b), "three rounds")
        c.pause("src")
        c.snapshot("src", snap)
        clones = c.clone(snap, 2, "k", resume=True)
        after = []
        for v in clones:  # a clone's console holds what it printed since the restore
            with ConsoleReader(c, v.vm_id) as con:
                data = con.wait(lambda b: len(rounds(b)) >= 3, "three rounds after the restore")
            got = rounds(data)
            assert all(n == 256 and not zero for n, _, zero in got.values()), data
            counted = c.get(v.vm_id).counters.entropy
            assert counted.device_id == "entropy" and counted.bytes_read >= 3 * 256
            assert counted.requests >= 3 and counted.bad_requests == 0
            after.append({r: got[r][1] for r in sorted(got)[:3]})
        a, b = after
        assert a.keys() == b.keys(), after  # the same rounds: both go on from the snapshot
        assert all(a[r] != b[r] for r in a), after  # with bytes of their own
