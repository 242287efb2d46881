"""Region table: where the BAT and the metadata region live, validated against each other and the log.

Copy 1 (192 KiB) is used when its signature and CRC are good, else copy 2 (256 KiB). Every region must be
1 MiB aligned, lie after the header section, not overlap another region or the log, and appear once; an
unknown region marked Required makes the file unopenable.

References: [MS-VHDX] §2.2.3.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import cast

from vhdx.errors import FormatError
from vhdx.findings import Code, Problem
from vhdx.format import checksum, layouts
from vhdx.format import constants as c
from vhdx.io import ImageIO, parse_bytes


@dataclass(frozen=True)
class RegionEntry:
    """One entry of a region table: which region (GUID), where and how long."""

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
    """One of the two region table copies as read, with the rule it breaks if any."""

    index: int
    offset: int
    raw: bytes
    entries: tuple[RegionEntry, ...]
    problem: str | None
    code: Code | None = None  # the rule the copy breaks (None when valid)

    @property
    def valid(self) -> bool:
        return self.problem is None

    @property
    def name(self) -> str:
        return f"Region Table {self.index + 1}"


@dataclass(frozen=True)
class RegionTable:
    """Both region table copies and which one is used."""

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
    if raw[: len(c.REGION_TABLE_SIGNATURE)] != c.REGION_TABLE_SIGNATURE or len(raw) < c.REGION_TABLE_SIZE:
        return RegionTableCopy(index, offset, raw, (), f"bad signature {raw[:4]!r}", Code.REGION_TABLE_SIGNATURE)
    head = parse_bytes(layouts.RegionTableHeader, raw[: c.REGION_TABLE_HEADER_SIZE], offset=offset, structure=name)
    if not checksum.verify(raw, c.REGION_TABLE_CHECKSUM_OFFSET):
        computed = checksum.crc32c_of(raw, c.REGION_TABLE_CHECKSUM_OFFSET)
        return RegionTableCopy(index, offset, raw, (), f"checksum {head.checksum:#010x} != computed {computed:#010x}",
                               Code.REGION_TABLE_CHECKSUM)
    if head.entry_count > c.REGION_TABLE_MAX_ENTRIES:
        return RegionTableCopy(index, offset, raw, (), f"entry count {head.entry_count} > {c.REGION_TABLE_MAX_ENTRIES}",
                               Code.REGION_TABLE_ENTRY_COUNT)
    entries = []
    for i in range(head.entry_count):
        start = c.REGION_TABLE_HEADER_SIZE + i * c.REGION_ENTRY_SIZE
        e = parse_bytes(layouts.RegionTableEntry, raw[start : start + c.REGION_ENTRY_SIZE], offset=offset + start)
        entries.append(RegionEntry(e.guid, e.file_offset, e.length, bool(e.flags & c.REGION_REQUIRED_FLAG), e.flags))
    return RegionTableCopy(index, offset, raw, tuple(entries), None)


def read_region_table_copies(io: ImageIO, *, exact: bool = True) -> tuple[RegionTableCopy, RegionTableCopy]:
    """Both region table copies, parsed (``exact``: a short file is an error, else a bad signature)."""
    copies: list[RegionTableCopy] = []
    for i, off in enumerate(c.REGION_TABLE_OFFSETS):
        name = f"Region Table {i + 1}"
        raw = io.read_exact_at(off, c.REGION_TABLE_SIZE, name) if exact else io.read_at(off, c.REGION_TABLE_SIZE)
        if copies and raw == copies[0].raw:  # the usual case: the same bytes parse alike (only their place differs)
            copies.append(replace(copies[0], index=i, offset=off))
        else:
            copies.append(parse_region_table_copy(raw, i))
    return copies[0], copies[1]


def table_problems(copy: RegionTableCopy, log_offset: int, log_length: int, file_size: int) -> list[Problem]:
    """Every rule the entries of one valid copy break (§2.2.3), in entry order; empty when the copy is good.

    Rules: BAT and metadata present exactly once; each region a non-empty 1 MiB-aligned span after the header
    section, inside the file; no unknown region marked required; no overlap between regions or with the log.
    A region past the end of the file does not stop the reader by itself (it refuses what it cannot read).
    """
    problems = []

    def entry_offset(i: int) -> int:
        return copy.offset + c.REGION_TABLE_HEADER_SIZE + i * c.REGION_ENTRY_SIZE

    def add(code: Code, offset: int, message: str, refuses_open: bool = True) -> None:
        problems.append(Problem(code, copy.name, offset, message, refuses_open=refuses_open))

    for guid, name in c.KNOWN_REGIONS.items():
        where = [i for i, e in enumerate(copy.entries) if e.guid == guid]
        if not where:
            add(Code.REGION_MISSING, copy.offset, f"the {name} region is missing")
        elif len(where) > 1:
            add(Code.REGION_DUPLICATE, entry_offset(where[1]), f"the {name} region appears {len(where)} times")
    spans = [("log", log_offset, log_offset + log_length, copy.offset)] if log_length else []
    for i, e in enumerate(copy.entries):
        if e.file_offset % c.ALIGNMENT or e.length % c.ALIGNMENT or e.file_offset < c.HEADER_SECTION_SIZE \
                or e.length == 0:
            add(Code.REGION_ALIGNMENT, entry_offset(i),
                f"{e.name} region at {e.file_offset:#x} length {e.length:#x} is not a non-empty 1 MiB-aligned "
                "span after the header section")
        if e.end > file_size:
            add(Code.REGION_BEYOND_EOF, entry_offset(i),
                f"{e.name} region ends at {e.end:#x} but the file at {file_size:#x}", refuses_open=False)
        if e.required and e.guid not in c.KNOWN_REGIONS:
            add(Code.REGION_UNKNOWN_REQUIRED, entry_offset(i), f"unknown region {e.guid} is marked required")
        spans.append((f"{e.name} region", e.file_offset, e.end, entry_offset(i)))
    spans.sort(key=lambda s: s[1])
    for (name_a, _, end_a, _), (name_b, start_b, _, where_b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            add(Code.REGION_OVERLAP, where_b, f"{name_b} overlaps {name_a}")
    return problems


def region_problems(copies: tuple[RegionTableCopy, RegionTableCopy], log_offset: int, log_length: int,
                    file_size: int) -> list[Problem]:
    """Every rule the two region table copies break, in the order check reports them.

    The reader uses the first copy with a good signature and checksum; a damaged or differing copy beside a
    good one is repairable. The rules of the used copy follow (``table_problems``).
    """
    valid = [copy for copy in copies if copy.valid]
    first_rules = table_problems(valid[0], log_offset, log_length, file_size) if valid else []
    # A copy with the first one's bytes breaks the same rules: only a differing copy is judged again.
    good = [copy for copy in valid if not (first_rules if copy.raw == valid[0].raw
                                           else table_problems(copy, log_offset, log_length, file_size))]
    problems = [Problem(cast(Code, copy.code), copy.name, copy.offset,
                        (copy.problem or "") + ("; the other copy is good" if good else ""),
                        repairable=bool(good), refuses_open=not valid)
                for copy in copies if not copy.valid]
    if not valid:
        return problems
    if len(valid) == 2 and valid[0].raw != valid[1].raw:
        problems.append(Problem(Code.REGION_TABLE_MISMATCH, valid[1].name, valid[1].offset,
                                "the two region table copies differ", repairable=bool(good), refuses_open=False))
    return problems + first_rules


def usable_copy(copies: tuple[RegionTableCopy, RegionTableCopy], log_offset: int, log_length: int,
                file_size: int) -> RegionTableCopy | None:
    """The copy the reader uses (the first valid one), or for check and repair the first good one if it is not."""
    valid = [copy for copy in copies if copy.valid]
    good = [copy for copy in valid if not table_problems(copy, log_offset, log_length, file_size)]
    return (good or valid or [None])[0]  # type: ignore[list-item]


def load_region_table(io: ImageIO, log_offset: int, log_length: int) -> RegionTable:
    """Read both copies, use the first valid one and raise the first rule that stops the reader."""
    copies = read_region_table_copies(io)
    problem = next((p for p in region_problems(copies, log_offset, log_length, io.size) if p.refuses_open), None)
    if problem is not None:
        raise FormatError.from_problem(problem, io.path)
    return RegionTable(copies, next(copy.index for copy in copies if copy.valid))


def build_region_table(entries: list[RegionEntry]) -> bytes:
    """The 64 KiB on-disk region table with its checksum."""
    buf = bytearray(c.REGION_TABLE_SIZE)
    buf[: c.REGION_TABLE_HEADER_SIZE] = layouts.RegionTableHeader.build(
        {"checksum": 0, "entry_count": len(entries), "reserved": 0})
    for i, e in enumerate(entries):
        start = c.REGION_TABLE_HEADER_SIZE + i * c.REGION_ENTRY_SIZE
        buf[start : start + c.REGION_ENTRY_SIZE] = layouts.RegionTableEntry.build(
            {"guid": e.guid, "file_offset": e.file_offset, "length": e.length,
             "flags": (e.flags & ~c.REGION_REQUIRED_FLAG) | (c.REGION_REQUIRED_FLAG if e.required else 0)})
    checksum.stamp(buf, c.REGION_TABLE_CHECKSUM_OFFSET)
    return bytes(buf)
