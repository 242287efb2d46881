"""Log entries as writers build them: the writes an entry carries and its serialised bytes with checksum.

Kept apart from ``vhdx.structures.log`` (which reads and replays logs) so that read-only commands do not load it.

References: [MS-VHDX] §2.3.1 (entry, descriptors, data sector).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from vhdx.format import checksum, layouts
from vhdx.format import constants as c
from vhdx.structures.log import SECTOR, descriptor_sectors


@dataclass(frozen=True)
class DataWrite:
    """A data descriptor with its reassembled 4 KiB target sector."""

    file_offset: int
    data: bytes


@dataclass(frozen=True)
class ZeroWrite:
    """A log zero descriptor: ``length`` bytes at ``file_offset`` read as zeros."""

    file_offset: int
    length: int


def build_entry(
    writes: list[DataWrite | ZeroWrite],
    *,
    sequence_number: int,
    log_guid: uuid.UUID,
    tail: int,
    flushed_file_offset: int,
    last_file_offset: int,
) -> bytes:
    """Serialise one log entry (header, descriptors, data sectors) with its checksum."""
    descriptors = []
    data_sectors = []
    for write in writes:
        if isinstance(write, DataWrite):
            if len(write.data) != SECTOR or write.file_offset % SECTOR:
                raise ValueError("data writes must be whole 4 KiB sectors at 4 KiB offsets")
            descriptors.append(layouts.DataDescriptor.build({
                "trailing_bytes": write.data[-4:], "leading_bytes": write.data[:8],
                "file_offset": write.file_offset, "sequence_number": sequence_number}))
            data_sectors.append(layouts.DataSector.build({
                "sequence_high": sequence_number >> 32, "data": write.data[8:-4],
                "sequence_low": sequence_number & 0xFFFFFFFF}))
        else:
            descriptors.append(layouts.ZeroDescriptor.build({
                "reserved": 0, "zero_length": write.length, "file_offset": write.file_offset,
                "sequence_number": sequence_number}))
    desc_sectors = descriptor_sectors(len(descriptors))
    length = (desc_sectors + len(data_sectors)) * SECTOR
    head = layouts.LogEntryHeader.build({
        "checksum": 0, "entry_length": length, "tail": tail, "sequence_number": sequence_number,
        "descriptor_count": len(descriptors), "reserved": 0, "log_guid": log_guid,
        "flushed_file_offset": flushed_file_offset, "last_file_offset": last_file_offset})
    buf = bytearray(length)
    area = head + b"".join(descriptors)
    buf[: len(area)] = area
    pos = desc_sectors * SECTOR
    for sector in data_sectors:
        buf[pos : pos + SECTOR] = sector
        pos += SECTOR
    checksum.stamp(buf, c.LOG_ENTRY_CHECKSUM_OFFSET)
    return bytes(buf)
