"""Kernel command line: defaults, PVM workarounds, user overrides, validation."""

import pytest

from vmmd.errors import InvalidSpecError
from vmmd.vm.boot.cmdline import (
    DEFAULT_CMDLINE,
    PVM_WORKAROUNDS,
    build_cmdline,
    encode_cmdline,
    is_pvm_host,
    virtio_mmio_word,
)


def test_default_without_and_with_pvm():
    assert build_cmdline(pvm_host=False) == DEFAULT_CMDLINE
    assert DEFAULT_CMDLINE.startswith("console=ttyS0 ")
    assert build_cmdline(pvm_host=True) == DEFAULT_CMDLINE + " " + PVM_WORKAROUNDS


def test_pvm_probe_is_injectable(tmp_path):
    assert not is_pvm_host(tmp_path / "kvm_pvm")
    (tmp_path / "kvm_pvm").mkdir()
    assert is_pvm_host(tmp_path / "kvm_pvm")


def test_clearcpuid_value_fits_linux_6_1():
    (word,) = [w for w in PVM_WORKAROUNDS.split() if w.startswith("clearcpuid=")]
    assert len(word.split("=", 1)[1]) <= 127  # cpu_parse_early_param's char arg[128]


def test_cmdline_replaces_and_append_adds():
    assert build_cmdline("console=hvc0", pvm_host=True) == "console=hvc0"
    assert (
        build_cmdline(append=" init=/bin/sh ", pvm_host=False) == DEFAULT_CMDLINE + " init=/bin/sh"
    )
    assert build_cmdline("a=1", "b=2") == "a=1 b=2"


def test_virtio_mmio_word():
    assert virtio_mmio_word(0xD000_1000, 6) == "virtio_mmio.device=4K@0xd0001000:6"


def test_length_limit_counts_the_nul():
    assert encode_cmdline("x" * 2047) == b"x" * 2047 + b"\0"
    with pytest.raises(InvalidSpecError) as e:
        encode_cmdline("x" * 2048)
    assert e.value.field == "boot.cmdline" and "at most 2047" in e.value.problem


@pytest.mark.parametrize("text", ["console=ttyS0 café", "a\nb", "a\tb", "a\0b"])
def test_non_printable_ascii_is_refused(text):
    with pytest.raises(InvalidSpecError) as e:
        encode_cmdline(text)
    assert e.value.field == "boot.cmdline" and "not printable ASCII" in e.value.problem
