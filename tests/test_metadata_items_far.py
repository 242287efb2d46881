"""A metadata item may lie anywhere in the metadata region, not only in the first KiB after the table.

The loader reads the table and what follows it at once (``METADATA_READ_AHEAD``); an item farther away is read
on its own and must give the same disk.
"""

from __future__ import annotations

import os
import struct

import vhdx
from vhdx.format import constants as c
from vhdx.ops.create import create
from vhdx.structures.metadata import METADATA_READ_AHEAD

MiB = 1 << 20


def test_an_item_past_the_read_ahead_is_read_on_its_own(tmp_path):
    path = str(tmp_path / "far.vhdx")
    create(path, 96 * MiB)
    with vhdx.open(path) as image:
        region = image.regions.metadata
        entry = next(e for e in image.metadata.entries if e.item_id == c.VIRTUAL_DISK_SIZE_GUID)
    far = METADATA_READ_AHEAD + 64 * 1024  # region offset of the moved item, well past what is read at once
    assert far + entry.length <= region.length
    fd = os.open(path, os.O_RDWR)
    try:
        item = os.pread(fd, entry.length, region.file_offset + entry.offset)
        os.pwrite(fd, bytes(entry.length), region.file_offset + entry.offset)  # nothing left where it was
        os.pwrite(fd, item, region.file_offset + far)
        os.pwrite(fd, struct.pack("<I", far), entry.table_offset + 16)  # the entry's offset field
    finally:
        os.close(fd)
    with vhdx.open(path) as image:
        assert image.virtual_size == 96 * MiB
        assert next(e.offset for e in image.metadata.entries if e.item_id == c.VIRTUAL_DISK_SIZE_GUID) == far
    assert vhdx.check_image(path).codes() == []
