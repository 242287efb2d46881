"""The two region table copies: each is read where it sits, and a copy that differs is judged on its own bytes.

(Identical copies are parsed once: the second one keeps its own index, offset and name.)
"""

from __future__ import annotations

import contextlib
import os
import uuid

import vhdx
from vhdx.findings import Code
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.ops.create import create
from vhdx.structures.region import (
    RegionEntry,
    build_region_table,
    read_region_table_copies,
    region_problems,
)

MiB = 1 << 20


def _disk(tmp_path) -> str:
    path = str(tmp_path / "d.vhdx")
    create(path, 64 * MiB)
    return path


def _layout(io: ImageIO):
    with vhdx.open(io.path) as image:
        h = image.headers.current
        return h.log_offset, h.log_length


def test_identical_copies_each_keep_their_own_place(tmp_path):
    with contextlib.closing(ImageIO.open(_disk(tmp_path))) as io:
        first, second = read_region_table_copies(io)
    assert first.raw == second.raw and first.entries == second.entries
    assert (first.index, first.offset, first.name) == (0, c.REGION_TABLE_OFFSETS[0], "Region Table 1")
    assert (second.index, second.offset, second.name) == (1, c.REGION_TABLE_OFFSETS[1], "Region Table 2")


def test_a_second_copy_with_other_valid_entries_is_parsed_from_its_own_bytes(tmp_path):
    path = _disk(tmp_path)
    with contextlib.closing(ImageIO.open(path)) as io:
        first, _ = read_region_table_copies(io)
    extra = RegionEntry(uuid.UUID(int=7), 64 * MiB, MiB, False)  # an unknown region, not required
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), build_region_table([*first.entries, extra]), c.REGION_TABLE_OFFSETS[1])
    with contextlib.closing(ImageIO.open(path)) as io:
        first, second = read_region_table_copies(io)
        log_offset, log_length = _layout(io)
        problems = region_problems((first, second), log_offset, log_length, io.size)
    assert second.valid and second.entries == (*first.entries, extra)
    assert [p.code for p in problems] == [Code.REGION_TABLE_MISMATCH]
