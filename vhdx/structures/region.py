"""Region table: where the BAT and the metadata region live, validated against each other and the log.

Copy 1 (192 KiB) is used when its signature and CRC are good, else copy 2 (256 KiB). Every region must be
1 MiB aligned, lie after the header section, not overlap another region or the log, and appear once; an
unknown region marked Required makes the file unopenable.

References: [MS-VHDX] §2.2.3.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from vhdx.errors import FormatError, UnsupportedError
from vhdx.format import checksum, layouts
from vhdx.format import constants as c
from vhdx.io import ImageIO, parse_bytes


@dataclass(frozen=True)
class RegionEntry:
    guid: uuid.UUID
    file_offset: int
    length: int
    required: bool
    flags: int = 0

    @property
    def name(self) -> str:
        return c.KNOWN_REGIONS.get(self.guid, str(self.guid))

    @property
    def end(self) -> int:
        return self.file_offset + self.length


@dataclass(frozen=True)
class RegionTableCopy:
    index: int
    offset: int
    raw: bytes
    entries: tuple[RegionEntry, ...]
    problem: str | None

    @property
    def valid(self) -> bool:
        return self.problem is None

    @property
    def name(self) -> str:
        return f"Region Table {self.index + 1}"


@dataclass(frozen=True)
class RegionTable:
    copies: tuple[RegionTableCopy, ...]  # always two: Region Table 1, Region Table 2
    used_index: int

    @property
    def entries(self) -> tuple[RegionEntry, ...]:
        return self.copies[self.used_index].entries

    def find(self, guid: uuid.UUID) -> RegionEntry:
        return next(entry for entry in self.entries if entry.guid == guid)

    @property
    def bat(self) -> RegionEntry:
        return self.find(c.BAT_REGION_GUID)

    @property
    def metadata(self) -> RegionEntry:
        return self.find(c.METADATA_REGION_GUID)


def parse_region_table_copy(raw: bytes, index: int) -> RegionTableCopy:
    """Parse one 64 KiB copy; structural problems are recorded, not raised."""
    offset = c.REGION_TABLE_OFFSETS[index]
    name = f"Region Table {index + 1}"
    if raw[:4] != c.REGION_TABLE_SIGNATURE:
        return RegionTableCopy(index, offset, raw, (), f"bad signature {raw[:4]!r}")
    head = parse_bytes(layouts.RegionTableHeader, raw[: c.REGION_TABLE_HEADER_SIZE], offset=offset, structure=name)
    if not checksum.verify(raw, c.REGION_TABLE_CHECKSUM_OFFSET):
        computed = checksum.crc32c_of(raw, c.REGION_TABLE_CHECKSUM_OFFSET)
        return RegionTableCopy(index, offset, raw, (), f"checksum {head.checksum:#010x} != computed {computed:#010x}")
    if head.entry_count > c.REGION_TABLE_MAX_ENTRIES:
        return RegionTableCopy(index, offset, raw, (), f"entry count {head.entry_count} > {c.REGION_TABLE_MAX_ENTRIES}")
    entries = []
    for i in range(head.entry_count):
        start = c.REGION_TABLE_HEADER_SIZE + i * c.REGION_ENTRY_SIZE
        e = parse_bytes(layouts.RegionTableEntry, raw[start : start + c.REGION_ENTRY_SIZE], offset=offset + start)
        entries.append(RegionEntry(e.guid, e.file_offset, e.length, bool(e.flags & 1), e.flags))
    return RegionTableCopy(index, offset, raw, tuple(entries), None)


def region_problems(entries: tuple[RegionEntry, ...], log_offset: int, log_length: int) -> list[str]:
    """Every rule a region table breaks (empty list = acceptable).

    Rules: BAT and metadata present exactly once; offsets and lengths multiples of 1 MiB; offsets past the
    header section; no overlap between regions or with the log.
    """
    problems = []
    for guid, name in c.KNOWN_REGIONS.items():
        count = sum(1 for e in entries if e.guid == guid)
        if count != 1:
            problems.append(f"{name} region appears {count} times (must be exactly once)")
    spans = [("log", log_offset, log_offset + log_length)] if log_length else []
    for e in entries:
        if e.file_offset % c.ALIGNMENT or e.length % c.ALIGNMENT:
            problems.append(f"{e.name} region at {e.file_offset:#x} length {e.length:#x} is not 1 MiB aligned")
        if e.file_offset < c.HEADER_SECTION_SIZE:
            problems.append(f"{e.name} region at {e.file_offset:#x} lies inside the header section")
        if e.length == 0:
            problems.append(f"{e.name} region has length 0")
        spans.append((f"{e.name} region", e.file_offset, e.end))
    spans.sort(key=lambda s: s[1])
    for (name_a, _, end_a), (name_b, start_b, _) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            problems.append(f"{name_a} overlaps {name_b}")
    return problems


def load_region_table(io: ImageIO, log_offset: int, log_length: int) -> RegionTable:
    """Read both copies, use the first valid one, validate it and refuse unknown required regions."""
    copies = tuple(
        parse_region_table_copy(io.read_exact_at(off, c.REGION_TABLE_SIZE, f"Region Table {i + 1}"), i)
        for i, off in enumerate(c.REGION_TABLE_OFFSETS)
    )
    usable = [copy for copy in copies if copy.valid]
    if not usable:
        raise FormatError(
            f"no valid region table (1: {copies[0].problem}; 2: {copies[1].problem})",
            structure="Region Table 1",
            offset=copies[0].offset,
            path=io.path,
        )
    used = usable[0]
    problems = region_problems(used.entries, log_offset, log_length)
    if problems:
        raise FormatError("; ".join(problems), structure=used.name, offset=used.offset, path=io.path)
    for entry in used.entries:
        if entry.required and entry.guid not in c.KNOWN_REGIONS:
            raise UnsupportedError(
                f"unknown required region {entry.guid}", structure=used.name, offset=used.offset, path=io.path
            )
    return RegionTable(copies, used.index)


def build_region_table(entries: list[RegionEntry]) -> bytes:
    """The 64 KiB on-disk region table with its checksum."""
    buf = bytearray(c.REGION_TABLE_SIZE)
    buf[: c.REGION_TABLE_HEADER_SIZE] = layouts.RegionTableHeader.build(
        {"checksum": 0, "entry_count": len(entries), "reserved": 0})
    for i, e in enumerate(entries):
        start = c.REGION_TABLE_HEADER_SIZE + i * c.REGION_ENTRY_SIZE
        buf[start : start + c.REGION_ENTRY_SIZE] = layouts.RegionTableEntry.build(
            {"guid": e.guid, "file_offset": e.file_offset, "length": e.length,
             "flags": (e.flags & ~1) | (1 if e.required else 0)})
    checksum.stamp(buf, c.REGION_TABLE_CHECKSUM_OFFSET)
    return bytes(buf)
