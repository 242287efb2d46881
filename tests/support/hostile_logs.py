"""Craft hostile logs: entries with chosen targets, lengths, counts and sequence numbers, named in the header.

Entries are built with ``vhdx.structures.log.build_entry`` (valid checksums), so they reach the rules past §2.3.2:
what the log may change and how long a scan may take.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.ops.create import create
from vhdx.structures.header import load_headers
from vhdx.structures.log import SECTOR, DataWrite, ZeroWrite, build_entry, descriptor_sectors

MiB = 1 << 20
GUID = uuid.UUID(int=0x10C)


def small_disk(path: Path, *, size: int = 8 * MiB, log_size: int = MiB) -> Path:
    """A dynamic disk (1 MiB blocks, log at 1 MiB) with its first block written."""
    import vhdx

    create(path, size, block_size=MiB, logical_sector_size=512, log_size=log_size)
    with vhdx.open(path, writable=True) as image:
        image.write(0, bytes(range(256)) * 4096)
    return path


def entry_length(writes) -> int:
    return (descriptor_sectors(len(writes)) + sum(isinstance(w, DataWrite) for w in writes)) * SECTOR


def plant_log(path: Path, entries: list[tuple[int, list[DataWrite | ZeroWrite]]], *, tail: int | None = None,
              first_sequence: int = 1, flushed: int | None = None, last: int | None = None,
              guid: uuid.UUID = GUID) -> int:
    """Write ``entries`` ((log position, writes) each, sequence numbers counting up) and name ``guid``.

    Every entry's Tail is ``tail`` (default: the first entry's position). Returns the log's file offset.
    """
    io = ImageIO.open(path, writable=True)
    try:
        headers = load_headers(io)
        h = headers.current
        size = -(-io.real_size // MiB) * MiB
        tail = entries[0][0] if tail is None else tail
        for i, (position, writes) in enumerate(entries):
            entry = build_entry(writes, sequence_number=first_sequence + i, log_guid=guid, tail=tail,
                                flushed_file_offset=size if flushed is None else flushed,
                                last_file_offset=size if last is None else last)
            io.write_at(h.log_offset + position, entry)
        io.write_at(headers.current_copy.offset, replace(h, log_guid=guid).to_bytes())
        io.flush()
        return h.log_offset
    finally:
        io.close()


def chain_of_empty_entries(count: int) -> list[tuple[int, list]]:
    """``count`` entries of one descriptor sector each (no writes), laid end to end from log position 0."""
    return [(i * SECTOR, []) for i in range(count)]


def layout_of(path: Path) -> dict[str, int]:
    import vhdx

    with vhdx.open(path) as image:
        return {"log": image.headers.current.log_offset, "log_length": image.headers.current.log_length,
                "bat": image.regions.bat.file_offset, "metadata": image.regions.metadata.file_offset,
                "size": image.io.real_size, "header_section": c.HEADER_SECTION_SIZE}


def plant_raw(path: Path, entries: list[tuple[int, bytes]], *, guid: uuid.UUID = GUID) -> None:
    """Write already built entries at their log positions (wrapping around the end of the log) and name ``guid``."""
    io = ImageIO.open(path, writable=True)
    try:
        headers = load_headers(io)
        h = headers.current
        for position, raw in entries:
            position %= h.log_length
            first = min(len(raw), h.log_length - position)
            io.write_at(h.log_offset + position, raw[:first])
            if first < len(raw):
                io.write_at(h.log_offset, raw[first : h.log_length])
        io.write_at(headers.current_copy.offset, replace(h, log_guid=guid).to_bytes())
        io.flush()
    finally:
        io.close()
