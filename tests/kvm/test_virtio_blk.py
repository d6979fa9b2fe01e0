"""virtio-blk under KVM with the micro-guest's minimal driver: data reaches
the host file, flush, GET_ID, read-only refusal, two drives, and a guest that
programs the device wrongly gets errors while the VMM and other VMs run on."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from tests.framework.guestrun import run_guest
from tests.framework.guests import microguest_builder
from vmmd.native import StopReason
from vmmd.spec import BootSpec, DriveSpec, VmSpec
from vmmd.vm.builder import build_vm

mg = microguest_builder()
SECTORS = 2048  # a 1 MiB image


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SECTORS * 2))
    return path


def blk(kernel: Path, words: str, *drives: DriveSpec):  # type: ignore[no-untyped-def]
    run = run_guest(kernel, f"mg=blk {words}", drives=drives)
    assert run.stop.reason == StopReason.RESET, run.console
    assert "MG-ERROR" not in run.console, run.console
    assert run.console.endswith("MG-DONE\n"), run.console
    return run


def line(run, prefix: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    found = [ln for ln in run.console.splitlines() if ln.startswith(prefix + " ")]
    assert found, run.console
    return dict(w.split("=", 1) for w in found[-1].split()[1:] if "=" in w)


def test_info_reports_capacity_and_features(microguests, image: Path) -> None:  # type: ignore[no-untyped-def]
    info = line(blk(microguests["pvh"], "op=info", DriveSpec("d0", str(image))), "MG-BLK")
    assert int(info["capacity"]) == SECTORS
    assert info["ro"] == "0"
    assert int(info["features"], 16) & (1 << 32)  # VERSION_1 negotiated


@pytest.mark.parametrize("flags", ["", "evidx=1", "indirect=1", "evidx=1 indirect=1"])
def test_written_sectors_land_in_the_file(microguests, image: Path, flags: str) -> None:  # type: ignore[no-untyped-def]
    run = blk(microguests["64"], f"op=write sector=8 count=8 seed=3 verify=1 {flags}",
              DriveSpec("d0", str(image)))
    assert line(run, "MG-BLK-WRITE")["status"] == "0"
    assert "MG-BLK-VERIFY ok" in run.console
    data = image.read_bytes()
    assert data[8 * 512:16 * 512] == mg.blk_pattern(3, 8 * 512)
    assert data[:8 * 512] == (bytes(range(256)) * 16)  # neighbours untouched
    assert data[16 * 512:17 * 512] == bytes(range(256)) * 2


def test_read_returns_the_file_contents(microguests, image: Path) -> None:  # type: ignore[no-untyped-def]
    got = line(blk(microguests["pvh"], "op=read sector=3 count=4", DriveSpec("d0", str(image))),
               "MG-BLK-READ")
    want = image.read_bytes()[3 * 512:7 * 512]
    assert got["status"] == "0"
    assert int(got["sum"], 16) == mg.fnv1a32(want)
    assert got["first"] == want[:16].hex()


def test_flush_and_get_id(microguests, image: Path) -> None:  # type: ignore[no-untyped-def]
    drive = DriveSpec("serial-0123456789abcdef", str(image))
    assert line(blk(microguests["pvh"], "op=flush", drive), "MG-BLK-FLUSH")["status"] == "0"
    run = blk(microguests["pvh"], "op=getid", drive)
    assert re.search(r"^MG-BLK-ID serial-0123456789abc status=0$", run.console, re.MULTILINE), run.console


def test_read_only_drive_refuses_writes(microguests, image: Path) -> None:  # type: ignore[no-untyped-def]
    before = image.read_bytes()
    drive = DriveSpec("d0", str(image), read_only=True)
    assert line(blk(microguests["pvh"], "op=info", drive), "MG-BLK")["ro"] == "1"
    run = blk(microguests["pvh"], "op=write sector=0 count=1 seed=9", drive)
    assert line(run, "MG-BLK-WRITE")["status"] == "1"  # VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before


def test_two_drives(microguests, image: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    other = tmp_path / "other.img"
    other.write_bytes(b"\x5a" * 4096)
    run = blk(microguests["pvh"], "op=twodev",
              DriveSpec("d0", str(image)), DriveSpec("d1", str(other), read_only=True))
    caps = re.findall(r"^MG-BLK dev=(\d) capacity=(\d+)", run.console, re.MULTILINE)
    assert caps == [("0", str(SECTORS)), ("1", "8")]
    firsts = re.findall(r"^MG-BLK-READ .* first=([0-9a-f]+)", run.console, re.MULTILINE)
    assert firsts == [bytes(range(16)).hex(), "5a" * 16]


HOSTILE = ["badaddr", "overflow", "loop", "longchain", "badqueue", "badhead", "badind", "nestind"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_driver_gets_needs_reset_and_recovers(microguests, image: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    run = blk(microguests["pvh"], f"op=hostile case={case}", DriveSpec("d0", str(image)))
    hostile, recover = line(run, "MG-BLK-HOSTILE"), line(run, "MG-BLK-RECOVER")
    assert int(hostile["status"], 16) & 0x40, run.console  # DEVICE_NEEDS_RESET
    assert hostile["result"] == "none"
    assert int(recover["status"], 16) == 0xF and recover["result"] == "0"


@pytest.mark.parametrize(("case", "ro"), [("beyond", False), ("wrapsector", False), ("rowrite", True)])
def test_bad_requests_fail_with_ioerr(microguests, image: Path, case: str, ro: bool) -> None:  # type: ignore[no-untyped-def]
    run = blk(microguests["pvh"], f"op=hostile case={case}", DriveSpec("d0", str(image), read_only=ro))
    assert line(run, "MG-BLK-HOSTILE")["result"] == "1"


def test_hostile_guest_does_not_disturb_another_vm(microguests, image: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A VM counting in memory keeps counting while another attacks its device."""
    spec = VmSpec(vm_id="bystander", boot=BootSpec(str(microguests["pvh"]),
                                                    cmdline="mg=count n=0 every=0"),
                  memory_mib=64)
    with build_vm(spec) as bystander:
        bystander.start()
        results = []
        threads = [threading.Thread(target=lambda c=c: results.append(
            blk(microguests["pvh"], f"op=hostile case={c}", DriveSpec("d0", str(image)))))
            for c in ("loop", "badaddr", "overflow")]
        for t in threads:
            t.start()
            t.join()
        assert len(results) == 3
        before = bystander.read_memory(0x200010, 8)
        threading.Event().wait(0.2)
        assert bystander.read_memory(0x200010, 8) != before  # still counting
        assert bystander.stop().reason == StopReason.REQUESTED
