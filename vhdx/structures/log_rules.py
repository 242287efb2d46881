"""What a log may write: the targets of its entries (§2.3.3) and the region tables it may rewrite (§2.2.3).

``target_problem`` is the one rule every replay (in memory or on disk) checks each write of the active sequence
against; ``region_table_problem`` checks the region tables a replay would leave.

References: [MS-VHDX] §2.2.3 (region table updates go through the log), §2.3.3 (log replay).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vhdx.errors import VhdxError
from vhdx.format import checksum
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.structures.bat import Geometry
from vhdx.structures.metadata import load_metadata
from vhdx.structures.region import load_region_table

if TYPE_CHECKING:
    from vhdx.structures.log import ReplayPlan

SECTOR = c.LOG_SECTOR_SIZE


@dataclass(frozen=True)
class LogBounds:
    """Where a log may write in one file: past the header section, outside the log itself, below ``end``.

    ``end`` is the largest file the layout can need: its structures (or the file, if longer) plus room for every
    payload block and, in a differencing disk, every sector bitmap block. Metadata, BAT, payload and bitmap
    blocks all lie in that span; the header section (headers and region tables) is never logged.
    """

    log_offset: int
    log_length: int
    end: int


def log_bounds(io: ImageIO, log_offset: int, log_length: int) -> LogBounds:
    """The span a log of this file may write: see ``LogBounds``. Damaged regions or metadata leave no room."""
    structures = max(c.HEADER_SECTION_SIZE, log_offset + log_length, align(io.real_size))
    room = 0
    try:
        regions = load_region_table(io, log_offset, log_length)
        structures = max(structures, *(e.end for e in regions.entries))
        p = load_metadata(io, regions.metadata).params
        g = Geometry(p.virtual_size, p.block_size, p.logical_sector_size, p.has_parent)
        room = g.data_blocks * g.block_size + (g.sector_bitmap_blocks * c.SECTOR_BITMAP_BLOCK_SIZE
                                               if p.has_parent else 0)
    except VhdxError:
        pass
    return LogBounds(log_offset, log_length, structures + room)


def align(n: int) -> int:
    """``n`` rounded up to 1 MiB."""
    return -(-n // c.ALIGNMENT) * c.ALIGNMENT


def _in_region_tables(offset: int, end: int) -> bool:
    first, last = c.REGION_TABLE_OFFSETS[0], c.REGION_TABLE_OFFSETS[-1] + c.REGION_TABLE_SIZE
    return first <= offset and end <= last


def target_problem(offset: int, length: int, bounds: LogBounds, *, data: bool = True) -> str | None:
    """Why a log may not write ``length`` bytes at ``offset`` (None when it may): the one rule for targets.

    The header section is never logged (the headers have their own two-copy update), except the region tables:
    [MS-VHDX] 2.2.3 has region table updates go through the log, as sector images. Such images must leave a
    valid table (``region_table_problem``, checked once the whole sequence is folded); zero ranges never may.
    """
    end = offset + length
    if offset < c.HEADER_SECTION_SIZE and not (data and _in_region_tables(offset, end)):
        return (f"targets {offset:#x}, inside the header section (only region tables may be logged there, as "
                "whole valid tables)")
    if offset < bounds.log_offset + bounds.log_length and bounds.log_offset < end:
        return f"targets {offset:#x}+{length:#x}, inside the log itself"
    if end > bounds.end:
        return (f"writes {length:#x} bytes at {offset:#x}, past {bounds.end:#x}, the largest file this layout "
                "can need")
    return None


def region_table_problem(io: ImageIO, plan: ReplayPlan) -> str | None:
    """Why the replayed region tables would be broken (None when each table the plan touches stays valid)."""
    for table_offset in c.REGION_TABLE_OFFSETS:
        touched = [t for t in plan.sources if table_offset <= t < table_offset + c.REGION_TABLE_SIZE]
        if not touched:
            continue
        table = bytearray(io.read_file_at(table_offset, c.REGION_TABLE_SIZE))
        for target in touched:
            table[target - table_offset : target - table_offset + SECTOR] = plan.sector(target)
        if table[:4] != c.REGION_TABLE_SIGNATURE or not checksum.verify(table, c.REGION_TABLE_CHECKSUM_OFFSET):
            return (f"rewrites the region table at {table_offset:#x} into one that fails its signature or "
                    "checksum")
    return None
