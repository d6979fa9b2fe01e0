"""`vmmd run` refuses bad input with one line naming the problem, exit 2,
before any VM exists: every case runs with a KVM path that does not exist,
so reaching VM creation would fail differently (exit 1, "create VM")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmmd.cli.main import _spec, build_parser, main

NO_KVM = "/nonexistent/kvm"


@pytest.fixture(scope="module")
def kernel(microguests) -> Path:  # type: ignore[no-untyped-def]
    return microguests["pvh"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["run", "--kvm", NO_KVM, *args])
    err = capsys.readouterr().err
    return code, err


def assert_refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "create VM" not in err


def test_missing_kernel(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, err = run(capsys, "--kernel", str(tmp_path / "nope"))
    assert_refused(code, err, "kernel", "No such file")


def test_kernel_is_a_directory(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, err = run(capsys, "--kernel", str(tmp_path))
    assert_refused(code, err, "kernel", "is a directory, not a regular file")


def test_kernel_is_a_fifo(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, err = run(capsys, "--kernel", str(fifo))
    assert_refused(code, err, "kernel", "is a FIFO, not a regular file")


def test_kernel_that_is_not_a_kernel(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(8192))
    code, err = run(capsys, "--kernel", str(junk))
    assert_refused(code, err, "kernel", "neither an ELF vmlinux nor a bzImage")


def test_missing_initrd(capsys, kernel: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, err = run(capsys, "--kernel", str(kernel), "--initrd", str(tmp_path / "nope"))
    assert_refused(code, err, "initrd", "No such file")


def test_memory_too_small_for_kernel_and_initrd(capsys, kernel: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    big = tmp_path / "initrd"
    with big.open("wb") as f:
        f.truncate(100 << 20)  # sparse: only its size matters
    code, err = run(capsys, "--kernel", str(kernel), "--initrd", str(big), "--mem-mib", "64")
    assert_refused(code, err, "too small")


@pytest.mark.parametrize("vcpus", ["0", "33", "-1"])
def test_vcpus_out_of_range(capsys, kernel: Path, vcpus: str) -> None:  # type: ignore[no-untyped-def]
    code, err = run(capsys, "--kernel", str(kernel), "--vcpus", vcpus)
    assert_refused(code, err, "vcpus", vcpus, "1..32")


@pytest.mark.parametrize("mib", ["0", "8", str(512 * 1024)])
def test_memory_out_of_range(capsys, kernel: Path, mib: str) -> None:  # type: ignore[no-untyped-def]
    code, err = run(capsys, "--kernel", str(kernel), "--mem-mib", mib)
    assert_refused(code, err, "memory")


def test_cmdline_too_long(capsys, kernel: Path) -> None:  # type: ignore[no-untyped-def]
    code, err = run(capsys, "--kernel", str(kernel), "--cmdline", "x" * 3000)
    assert_refused(code, err, "cmdline", "at most 2047")


def test_cmdline_not_ascii(capsys, kernel: Path) -> None:  # type: ignore[no-untyped-def]
    code, err = run(capsys, "--kernel", str(kernel), "--cmdline", "console=ttyS0 é")
    assert_refused(code, err, "cmdline")


def test_vcpus_not_a_number(capsys, kernel: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        main(["run", "--kvm", NO_KVM, "--kernel", str(kernel), "--vcpus", "two"])
    assert exc.value.code == 2
    assert "vcpus: 'two' is not an integer" in capsys.readouterr().err


def test_cmdline_and_append_are_exclusive(capsys, kernel: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        main(["run", "--kvm", NO_KVM, "--kernel", str(kernel), "--cmdline", "a", "--append", "b"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_valid_input_reaches_vm_creation(capsys, kernel: Path) -> None:  # type: ignore[no-untyped-def]
    """The control case: with good input the only failure left is the fake KVM path."""
    code, err = run(capsys, "--kernel", str(kernel))
    assert code == 1
    assert "create VM" in err and "No such file" in err


def test_acpi_option_reaches_the_spec(kernel: Path) -> None:
    parser = build_parser()
    assert _spec(parser.parse_args(["run", "--kernel", str(kernel), "--acpi"])).acpi
    assert not _spec(parser.parse_args(["run", "--kernel", str(kernel)])).acpi


def test_drive_missing_file(capsys, kernel: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, err = run(capsys, "--kernel", str(kernel), "--drive", str(tmp_path / "nope.img"))
    assert_refused(code, err, "drives[0].path", "No such file")


def test_drive_unknown_option(capsys, kernel: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, err = run(capsys, "--kernel", str(kernel), "--drive", f"{tmp_path}/d.img,rw")
    assert_refused(code, err, "unknown option 'rw'")


def test_drive_used_twice_for_writing(capsys, kernel: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 4096)
    code, err = run(capsys, "--kernel", str(kernel), "--drive", str(img), "--drive", str(img))
    assert_refused(code, err, "drives[1].path", "in use by another VM")


def test_net_unknown_option(capsys, kernel: Path) -> None:  # type: ignore[no-untyped-def]
    code, err = run(capsys, "--kernel", str(kernel), "--net", "tap0,vhost")
    assert_refused(code, err, "unknown option 'vhost'")


def test_net_malformed_mac(capsys, kernel: Path) -> None:  # type: ignore[no-untyped-def]
    code, err = run(capsys, "--kernel", str(kernel), "--net", "tap0,mac=02:00:00")
    assert_refused(code, err, "--net 1 (network_interfaces[0].guest_mac)", "is not a MAC address")


def test_net_same_tap_twice(capsys, kernel: Path) -> None:  # type: ignore[no-untyped-def]
    code, err = run(capsys, "--kernel", str(kernel), "--net", "tap0", "--net", "tap0")
    assert_refused(code, err, "--net 2 (network_interfaces[1].host_dev_name)",
                   "used by network_interfaces[0]")
