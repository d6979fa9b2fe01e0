"""The AML encoder against the byte encodings of ACPI 6.5 chapter 20 (written out as literals,
not derived from the code), and against iasl: what it builds disassembles to the ASL meant."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.acpi_tools import disassemble, wrap_dsdt
from vmmd.vm.boot import aml


@pytest.mark.parametrize(("body", "encoded"), [
    (0, b"\x01"),
    (62, b"\x3f"),  # 62 + 1 = 63: the largest one-byte length
    (63, b"\x41\x04"),  # 63 + 2 = 65 = 0x41: low nibble 1, then 0x04
    (0xFFD, b"\x4f\xff"),  # 0xFFD + 2 = 0xFFF: the largest two-byte length
    (0xFFE, b"\x81\x00\x01"),  # 0xFFE + 3 = 0x1001
    (0xFFFFC, b"\x8f\xff\xff"),  # 0xFFFFF: the largest three-byte length
    (0xFFFFD, b"\xc1\x00\x00\x01"),  # 0xFFFFD + 4 = 0x100001
])
def test_pkg_length_counts_itself(body: int, encoded: bytes) -> None:
    assert aml.pkg_length(body) == encoded


def test_pkg_length_refuses_past_2_to_the_28() -> None:
    with pytest.raises(ValueError):
        aml.pkg_length(1 << 28)


@given(st.integers(0, (1 << 28) - 5))
def test_pkg_length_decodes_back(body: int) -> None:
    enc = aml.pkg_length(body)
    extra = enc[0] >> 6
    assert len(enc) == extra + 1
    total = enc[0] & 0x3F if extra == 0 else (enc[0] & 0x0F) | int.from_bytes(enc[1:], "little") << 4
    assert total == body + len(enc)
    assert extra == 0 or enc[0] & 0x30 == 0  # bits 4-5 of a multi-byte lead are reserved


@pytest.mark.parametrize(("name", "encoded"), [
    ("_HID", b"_HID"),
    ("GED", b"GED_"),
    ("\\_SB", b"\\_SB_"),
    ("\\_SB.VGEN", b"\\\x2e_SB_VGEN"),
    ("^^PCI0", b"^^PCI0"),
    ("A.B.C", b"\x2f\x03A___B___C___"),
    ("\\", b"\\\x00"),
])
def test_name_strings(name: str, encoded: bytes) -> None:
    assert aml.name_string(name) == encoded


@pytest.mark.parametrize("bad", ["A..B", "TOOLONG", "a", "1ABC", "A-B", "\\_SB."])
def test_bad_name_segments_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        aml.name_string(bad)


@pytest.mark.parametrize(("value", "encoded"), [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"), (0x100, b"\x0b\x00\x01"),
    (0xFF000, b"\x0c\x00\xf0\x0f\x00"), (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")),
    ((1 << 64) - 1, b"\xff"),
])
def test_integers_take_the_shortest_form(value: int, encoded: bytes) -> None:
    assert aml.integer(value) == encoded


def test_strings_eisa_ids_and_buffers() -> None:
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"
    assert aml.eisa_id("PNP0501") == b"\x0c\x41\xd0\x05\x01"  # 0x0105D041, as iasl encodes it
    assert aml.buffer(b"\x79\x00") == b"\x11\x05\x0a\x02\x79\x00"
    assert aml.package(aml.integer(2), aml.integer(0)) == b"\x12\x05\x02\x0a\x02\x00"


def test_resource_descriptors() -> None:
    assert aml.io(0x3F8, 8) == bytes.fromhex("47 01 f803 f803 01 08")
    assert aml.memory32_fixed(0xD000_0000, 0x1000) == bytes.fromhex("86 0900 01 000000d0 00100000")
    # flags: consumer | edge; one interrupt
    assert aml.interrupt(5, edge=True) == bytes.fromhex("89 0600 03 01 05000000")
    assert aml.interrupt(9, edge=False, active_low=True, shared=True)[3] == 0x0D


def test_a_small_dsdt_disassembles_to_what_was_meant() -> None:
    dsl = disassemble(wrap_dsdt(aml.scope("\\_SB", aml.device(
        "DEV0",
        aml.name("_HID", aml.string("LNRO0005")),
        aml.name("_CRS", aml.resource_template([aml.memory32_fixed(0xD000_0000, 0x1000),
                                                aml.interrupt(7, edge=True)])),
        aml.method("_EVT", 1, aml.if_(aml.lequal(aml.arg(0), aml.integer(7)),
                                      aml.notify("\\_SB.DEV0", 0x80))),
        aml.method("ADDR", 0, aml.return_(aml.package(aml.integer(0x1234), aml.integer(0))))))))
    flat = " ".join(dsl.split())
    assert 'Device (DEV0) { Name (_HID, "LNRO0005")' in flat
    assert "Memory32Fixed (ReadWrite, 0xD0000000, // Address Base 0x00001000, // Address Length )" in flat
    assert "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000007, }" in flat
    assert "If ((Arg0 == 0x07)) { Notify (\\_SB.DEV0, 0x80)" in flat
    assert "Method (ADDR, 0, NotSerialized) { Return (Package (0x02) { 0x1234, Zero }) }" in flat
