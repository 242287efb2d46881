"""CRC-32C (Castagnoli) over a structure whose own 4-byte checksum field counts as zero.

The checksum always spans the whole structure (4 KiB header, 64 KiB region table, EntryLength bytes
of a log entry), reserved bytes included.

References: [MS-VHDX] §2.2.2, §2.2.3.1, §2.3.1.1.
"""

from __future__ import annotations

import struct

from crc32c import crc32c

_ZERO_FIELD = b"\x00\x00\x00\x00"


def crc32c_of(buf: bytes | bytearray | memoryview, crc_offset: int) -> int:
    """CRC-32C of ``buf`` computed as if the 4 bytes at ``crc_offset`` were zero (no copy of buf)."""
    view = memoryview(buf)
    crc = crc32c(view[:crc_offset])
    crc = crc32c(_ZERO_FIELD, crc)
    return crc32c(view[crc_offset + 4 :], crc)


def stored_crc(buf: bytes | bytearray | memoryview, crc_offset: int) -> int:
    """The checksum value stored in the structure (little-endian u32)."""
    return struct.unpack_from("<I", buf, crc_offset)[0]


def verify(buf: bytes | bytearray | memoryview, crc_offset: int) -> bool:
    """True when the stored checksum matches the computed one."""
    return stored_crc(buf, crc_offset) == crc32c_of(buf, crc_offset)


def stamp(buf: bytearray | memoryview, crc_offset: int) -> int:
    """Compute the checksum and store it in place; returns the value."""
    crc = crc32c_of(buf, crc_offset)
    struct.pack_into("<I", buf, crc_offset, crc)
    return crc
