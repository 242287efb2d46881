"""CRC-32C helpers: the Castagnoli check value, verification of a real header, stamping in place."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.corpus import corpus_file
from vhdx.format import checksum
from vhdx.format import constants as c


def real_header() -> bytes:
    return corpus_file("libvhdi-fragments/image_header.1").read_bytes()


def test_checksum_crc32c_check_value():
    # The catalogued check value of CRC-32C (Castagnoli, reflected, init and xorout 0xFFFFFFFF) over "123456789",
    # computed by the very function the checksum helpers call.
    assert checksum.crc32c(b"123456789") == 0xE3069283


def test_checksum_crc32c_of_equals_crc_of_copy_with_field_zeroed():
    buf = b"12345678" + b"\xde\xad\xbe\xef" + b"9abcdef"
    assert checksum.crc32c_of(buf, 8) == checksum.crc32c(b"12345678" + bytes(4) + b"9abcdef")


def test_checksum_real_header_verifies():
    raw = real_header()
    assert checksum.stored_crc(raw, c.HEADER_CHECKSUM_OFFSET) == 0x9F69B235
    assert checksum.verify(raw, c.HEADER_CHECKSUM_OFFSET)


def test_checksum_real_header_value_is_computed_with_field_zeroed():
    raw = bytearray(real_header())
    raw[4:8] = b"\xff\xff\xff\xff"
    assert checksum.crc32c_of(raw, c.HEADER_CHECKSUM_OFFSET) == 0x9F69B235


@pytest.mark.parametrize("position", [0, 3, 8, 0x40, 0x4F, 0x800, 0xFFF])
def test_checksum_real_header_flipped_byte_fails(position):
    raw = bytearray(real_header())
    raw[position] ^= 0x01
    assert not checksum.verify(raw, c.HEADER_CHECKSUM_OFFSET)


def test_checksum_stamp_restores_real_header():
    raw = bytearray(real_header())
    raw[4:8] = bytes(4)
    assert checksum.stamp(raw, c.HEADER_CHECKSUM_OFFSET) == 0x9F69B235
    assert bytes(raw) == real_header()


@given(st.binary(min_size=8, max_size=4096), st.integers(min_value=0, max_value=2**32 - 1))
def test_checksum_stamp_then_verify(body, garbage):
    buf = bytearray(body)
    buf[4:8] = garbage.to_bytes(4, "little")
    value = checksum.stamp(buf, 4)
    assert checksum.verify(buf, 4)
    assert checksum.stored_crc(buf, 4) == value
    assert value == checksum.crc32c_of(body, 4)
