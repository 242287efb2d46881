"""Offline consistency check of a VHDX file (and optionally its whole chain): every problem as a Finding.

The check reads the structures itself with the low-level parsers instead of opening a ``VhdxImage``, so it
also works on files the reader refuses. It never raises for what it finds; only a file that cannot be read
at all (not a VHDX, I/O error) gives a report with ``checked = False``.

Order: file identifier, both headers, the log (a replayable log is applied in memory, as a reader would see
the file), both region tables, the metadata table and its items, the parent locator and the parent, the BAT
(numpy, in windows of whole chunks so a 64 Mi-entry BAT needs bounded memory), overlaps (by sorting block
offsets), and unreferenced space (a 1 MiB-granular map of the file minus every structure that references it):
free space between structures, or a leak when a tail of at least one block lies past everything referenced.
Checks added by other modules run last (see ``register_checker``).

References: [MS-VHDX] §2.2 (header section), §2.3 (log), §2.5 (BAT), §2.6 (metadata, parent locator).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from vhdx.disk import chain as _chain
from vhdx.disk.image import foreign_file_reason
from vhdx.errors import VhdxError
from vhdx.findings import CODES, Finding, Severity
from vhdx.format import constants as c
from vhdx.format import layouts
from vhdx.io import ImageIO, parse_bytes
from vhdx.ops.merge.journal import report_interrupted_merge
from vhdx.structures.bat import BAT_DTYPE, Geometry, ceil_div, payload_missing_bytes
from vhdx.structures.header import Header, HeaderCopy, choose_current, load_headers, parse_header_copy
from vhdx.structures.log import LogState, overlay_for, read_log
from vhdx.structures.metadata import (
    ITEM_LAYOUTS,
    KNOWN_ITEMS,
    DiskParameters,
    MetadataEntry,
    ParentLocator,
    load_metadata,
    parameter_problems,
    parse_parent_locator,
)
from vhdx.structures.region import RegionEntry, RegionTableCopy, load_region_table, parse_region_table_copy

# BAT entries examined per step (rounded down to whole chunks): 1 Mi entries = 8 MiB of BAT.
WINDOW_ENTRIES = 1 << 20
# Findings of one code reported one by one; the rest are summed up in one more finding.
MAX_FINDINGS_PER_CODE = 32

_OFFSET_MASK = np.uint64(~((1 << c.BAT_OFFSET_SHIFT) - 1) & (2**64 - 1))
_EMPTY = np.uint32(0xFFFFFFFF)
_PRESENT_STATES = (c.BatState.FULLY_PRESENT, c.BatState.PARTIALLY_PRESENT)
# States whose entry may keep the file offset it had while present (the writer reuses that space).
_KEEPING_STATES = c.ZERO_READING_STATES

# Flags (IsUser, IsVirtualDisk, IsRequired) the spec's table gives each system item (§2.6.2).
EXPECTED_ITEM_FLAGS = {
    c.FILE_PARAMETERS_GUID: c.META_IS_REQUIRED,
    c.VIRTUAL_DISK_SIZE_GUID: c.META_IS_REQUIRED | c.META_IS_VIRTUAL_DISK,
    c.VIRTUAL_DISK_ID_GUID: c.META_IS_REQUIRED | c.META_IS_VIRTUAL_DISK,
    c.LOGICAL_SECTOR_SIZE_GUID: c.META_IS_REQUIRED | c.META_IS_VIRTUAL_DISK,
    c.PHYSICAL_SECTOR_SIZE_GUID: c.META_IS_REQUIRED | c.META_IS_VIRTUAL_DISK,
    c.PARENT_LOCATOR_GUID: c.META_IS_REQUIRED,
}
_FLAG_BITS = c.META_IS_USER | c.META_IS_VIRTUAL_DISK | c.META_IS_REQUIRED


@dataclass(frozen=True)
class CheckReport:
    """What ``check_image`` found in one file, plus the reports of its ancestors when asked for the chain.

    Attributes:
        path: the file checked.
        findings: every finding of this file, in the order the checks ran.
        checked: False when the file could not be checked at all (I/O error, not a VHDX).
        file_size: size of the file in bytes.
        leaked_bytes: unreferenced bytes at the end of the file, at least one block (what a crash during block
            allocation leaves; exit 3, ``repair --leaks`` cuts them).
        free_bytes: unreferenced bytes that are not a leak: gaps between structures and short tails (reclaimable
            only by compaction, e.g. ``vhdx convert``).
        parents: reports of the parent, grandparent... (``chain=True`` only).
        error: why the file could not be checked (``checked`` False).
    """

    path: str
    findings: tuple[Finding, ...]
    checked: bool = True
    file_size: int = 0
    leaked_bytes: int = 0
    parents: tuple[CheckReport, ...] = ()
    error: str | None = None
    free_bytes: int = 0

    @property
    def all_findings(self) -> tuple[Finding, ...]:
        out = list(self.findings)
        for report in self.parents:
            out.extend(report.findings)
        return tuple(out)

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.all_findings if f.severity == Severity.ERROR)

    @property
    def leaks(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.all_findings if f.severity == Severity.LEAK)

    @property
    def clean(self) -> bool:
        """No corruption and no leak (warnings and notes allowed)."""
        return self.exit_code == 0

    @property
    def exit_code(self) -> int:
        """0 clean, 1 could not check, 2 corruption found, 3 only leaked space (as ``qemu-img check``)."""
        if not self.checked or any(not r.checked for r in self.parents):
            return 1
        if self.errors:
            return 2
        return 3 if self.leaks else 0

    def codes(self) -> list[str]:
        return [f.code for f in self.all_findings]

    def find(self, code: str) -> list[Finding]:
        return [f for f in self.all_findings if f.code == code]

    def to_json(self) -> dict:
        return {
            "path": self.path, "checked": self.checked, "error": self.error, "exit_code": self.exit_code,
            "file_size": self.file_size, "leaked_bytes": self.leaked_bytes,
            "free_bytes": self.free_bytes,
            "findings": [f.to_json() for f in self.findings],
            "parents": [r.to_json() for r in self.parents],
        }


@dataclass
class CheckContext:
    """State shared by the individual checks of one file (filled in as the checks go)."""

    io: ImageIO
    path: str
    findings: list[Finding] = field(default_factory=list)
    header_copies: tuple[HeaderCopy, ...] = ()
    header: Header | None = None
    log: LogState | None = None
    region_copies: tuple[RegionTableCopy, ...] = ()
    regions: tuple[RegionEntry, ...] = ()
    bat_region: RegionEntry | None = None
    metadata_region: RegionEntry | None = None
    metadata_entries: tuple[MetadataEntry, ...] = ()
    params: DiskParameters | None = None
    locator: ParentLocator | None = None
    geometry: Geometry | None = None
    # 1 MiB granules of the file that some structure references (leak map), made on first use.
    space: np.ndarray | None = None
    leaked_bytes: int = 0
    free_bytes: int = 0
    # Payload blocks that own file space (present, or keeping the offset they had): fixed disks owe the rest.
    placed_blocks: int = 0
    in_use: bool = False  # another process has the file open for writing (what it is changing may look odd)
    _counts: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """File size as a reader sees it (after an in-memory log replay)."""
        return self.io.size

    def add(self, severity: Severity, code: str, structure: str, offset: int | None, message: str, *,
            repairable: bool = False) -> None:
        """Record a finding; past MAX_FINDINGS_PER_CODE of one code only the count grows."""
        assert code in CODES, code
        n = self._counts.get(code, 0)
        self._counts[code] = n + 1
        if n < MAX_FINDINGS_PER_CODE:
            self.findings.append(Finding(severity, code, structure, offset, message, self.path, repairable))

    def summarise(self) -> None:
        """One more finding per code whose findings were cut off."""
        for code, n in self._counts.items():
            if n > MAX_FINDINGS_PER_CODE:
                first = next(f for f in self.findings if f.code == code)
                self.findings.append(Finding(first.severity, code, "summary", None,
                                             f"{n - MAX_FINDINGS_PER_CODE} more {code} findings not listed",
                                             self.path, first.repairable))

    def _space(self) -> np.ndarray:
        if self.space is None:
            self.space = np.zeros(ceil_div(self.io.real_size, c.ALIGNMENT), dtype=bool)
        return self.space

    def reference(self, start: int, end: int) -> None:
        """Mark the byte span [start, end) as referenced by a structure (for leak detection)."""
        space = self._space()
        space[max(0, start // c.ALIGNMENT) : max(0, ceil_div(end, c.ALIGNMENT))] = True

    def reference_blocks(self, start_mb: np.ndarray, length_mb: int) -> None:
        """Mark ``length_mb`` granules from each of ``start_mb`` (1 MiB units) as referenced."""
        space = self._space()
        for j in range(length_mb):
            units = start_mb + j
            space[units[units < len(space)]] = True

    @property
    def has_errors(self) -> bool:
        return any(f.severity == Severity.ERROR for f in self.findings)


# Checks other modules add (e.g. the merge engine's interrupted-merge marker): each gets the CheckContext
# after the built-in checks and records findings with ``ctx.add``. ``ctx.params`` is None when the
# metadata could not be read.
EXTRA_CHECKERS: list[Callable[[CheckContext], None]] = []


def register_checker(checker: Callable[[CheckContext], None]) -> Callable[[CheckContext], None]:
    """Add a check that runs after the built-in ones (usable as a decorator)."""
    if checker not in EXTRA_CHECKERS:
        EXTRA_CHECKERS.append(checker)
    return checker


@dataclass(frozen=True)
class CheckOptions:
    """Where to look for parents (same meaning as for opening a chain)."""

    chain: bool = False
    parent: str | None = None
    search_dirs: tuple[str, ...] = ()
    ignore_id_mismatch: bool = False


def check_image(source, chain: bool = False, *, parent: str | None = None, search_dirs=(),
                ignore_id_mismatch: bool = False) -> CheckReport:
    """Check one file (``chain=True``: and every ancestor) and return what was found; never raises for findings.

    Args:
        source: a path, an ``ImageIO`` or an open ``VhdxImage`` (its file is only read).
        chain: also check each parent file, down to the base disk.
        parent: explicit parent path of ``source`` (overrides its locator).
        search_dirs: folders where parents are also looked for by file name.
        ignore_id_mismatch: accept a parent whose DataWriteGuid does not match the linkage.
    """
    options = CheckOptions(chain, os.fspath(parent) if parent else None,
                           tuple(os.fspath(d) for d in search_dirs), ignore_id_mismatch)
    # The chain is walked in a loop (a 1024-layer chain must not recurse), each file checked on its own.
    reports: list[CheckReport] = []
    visited: tuple = ()
    while True:
        report, parent_path, visited = _check_source(source, options, visited)
        reports.append(report)
        if parent_path is None:
            break
        source = parent_path
        options = CheckOptions(True, None, options.search_dirs, options.ignore_id_mismatch)
    top = reports[0]
    return replace(top, parents=tuple(reports[1:])) if len(reports) > 1 else top


def _check_source(source, options: CheckOptions, visited: tuple) -> tuple[CheckReport, str | None, tuple]:
    """Check one file; returns its report, the parent to check next (``chain`` only) and the files seen so far."""
    owns = False
    if isinstance(source, ImageIO):
        io = source
    elif hasattr(source, "io") and isinstance(source.io, ImageIO):
        io = source.io
    else:
        path = os.fspath(source)
        try:
            io = ImageIO.open(path)
        except VhdxError as exc:
            return CheckReport(path, (), checked=False, error=str(exc)), None, visited
        owns = True
    saved_overlay = io.overlay
    try:
        return _check_io(io, options, visited)
    except VhdxError as exc:  # an I/O error while reading: the file could not be checked
        return CheckReport(io.path, (), checked=False, error=str(exc)), None, visited
    finally:
        if owns:
            io.close()
        else:
            io.overlay = saved_overlay


def _identity(io: ImageIO):
    if io.fd is None:
        return None
    st = os.fstat(io.fd)
    return (st.st_dev, st.st_ino)


def _check_io(io: ImageIO, options: CheckOptions, visited: tuple) -> tuple[CheckReport, str | None, tuple]:
    ctx = CheckContext(io, io.path)
    if not _check_identifier(ctx):
        return CheckReport(io.path, tuple(ctx.findings), checked=False, file_size=io.real_size,
                           error=ctx.findings[-1].message), None, visited
    parent_path = None
    visited = (*visited, _identity(io))
    ctx.in_use = not io.writable and io.writer_lock_held()
    if ctx.in_use:
        ctx.add(Severity.WARNING, "IN_USE", "File", None,
                "another process has the file open for writing; findings may be transient")
    _check_headers(ctx)
    _check_log(ctx)
    _check_region_tables(ctx)
    _check_metadata(ctx)
    if ctx.params is not None and ctx.params.has_parent:
        parent_path = _check_parent(ctx, options, visited)
    _check_bat(ctx)
    _check_leaks(ctx)
    report_interrupted_merge(ctx)
    for checker in EXTRA_CHECKERS:
        checker(ctx)
    ctx.summarise()
    return CheckReport(io.path, tuple(ctx.findings), True, io.real_size, ctx.leaked_bytes,
                       free_bytes=ctx.free_bytes), parent_path, visited


# --- §2.2.1 file identifier ------------------------------------------------------------------------
def _check_identifier(ctx: CheckContext) -> bool:
    raw = ctx.io.read_at(0, len(c.FILE_SIGNATURE))
    if ctx.io.real_size < len(c.FILE_SIGNATURE) or raw != c.FILE_SIGNATURE:
        # The bytes found are not quoted: they may be the start of any file (a locator can name /etc/shadow).
        ctx.add(Severity.ERROR, "NOT_VHDX", "File Type Identifier", 0,
                foreign_file_reason(ctx.io) or "not a VHDX file (it does not start with the 'vhdxfile' signature)")
        return False
    if ctx.io.real_size < c.HEADER_SECTION_SIZE:
        ctx.add(Severity.ERROR, "FILE_TRUNCATED", "Header section", ctx.io.real_size,
                f"the file is {ctx.io.real_size} bytes, shorter than the 1 MiB header section")
    ctx.reference(0, c.HEADER_SECTION_SIZE)
    return True


# --- §2.2.2 headers --------------------------------------------------------------------------------
def _header_problem_code(problem: str) -> str:
    if problem.startswith("bad signature") or problem == "truncated":
        return "HEADER_SIGNATURE"
    if problem.startswith("checksum"):
        return "HEADER_CHECKSUM"
    return "HEADER_VERSION"


def _parse_header_safely(raw: bytes, index: int) -> HeaderCopy:
    try:
        return parse_header_copy(raw, index)
    except VhdxError as exc:
        return HeaderCopy(index, c.HEADER_OFFSETS[index], raw, None, f"bad signature ({exc.message})")


def _check_headers(ctx: CheckContext) -> None:
    copies = tuple(_parse_header_safely(ctx.io.read_at(off, c.HEADER_SIZE), i)
                   for i, off in enumerate(c.HEADER_OFFSETS))
    ctx.header_copies = copies
    index = choose_current(copies)
    for copy in copies:
        if not copy.valid:
            twin_ok = index is not None
            ctx.add(Severity.ERROR, _header_problem_code(copy.problem), copy.name, copy.offset,
                    f"{copy.problem}" + ("; the other copy is valid and current" if twin_ok else ""),
                    repairable=twin_ok)
        elif copy.header.log_version != c.LOG_VERSION:
            ctx.add(Severity.ERROR, "HEADER_VERSION", copy.name, copy.offset,
                    f"log version {copy.header.log_version} (only 0 is defined)")
    if index is None:
        if all(copy.valid for copy in copies):
            ctx.add(Severity.ERROR, "HEADER_NO_CURRENT", "Header 1", copies[0].offset,
                    f"both headers have sequence number {copies[0].header.sequence_number} but differ")
        else:
            ctx.add(Severity.ERROR, "HEADER_NO_CURRENT", "Header 1", copies[0].offset, "no header copy is valid")
        return
    current, other = copies[index], copies[1 - index]
    ctx.header = current.header
    if other.valid:
        if other.header.sequence_number == current.header.sequence_number:
            ctx.add(Severity.WARNING, "HEADER_SEQUENCE_TIE", other.name, other.offset,
                    f"both headers are identical with sequence number {current.header.sequence_number}")
        elif _header_content(other.header) != _header_content(current.header):
            # Normal: the update protocol writes the two copies alternately, so the other one is one step behind.
            ctx.add(Severity.INFO, "HEADER_STALE", other.name, other.offset,
                    f"the older copy (sequence number {other.header.sequence_number}, current "
                    f"{current.header.sequence_number}), as every header update leaves it")
    h = current.header
    if h.log_length or h.log_guid != c.ZERO_GUID:
        if h.log_offset % c.ALIGNMENT or h.log_length % c.ALIGNMENT or h.log_offset < c.HEADER_SECTION_SIZE \
                or h.log_length == 0:
            ctx.add(Severity.ERROR, "HEADER_LOG_PLACEMENT", current.name, current.offset,
                    f"log at {h.log_offset:#x} length {h.log_length:#x} is not 1 MiB aligned after the header "
                    "section")
            return
    if h.log_length:
        if h.log_offset + h.log_length > ctx.io.real_size:
            ctx.add(Severity.ERROR, "FILE_TRUNCATED", "Log", h.log_offset,
                    f"the log ends at {h.log_offset + h.log_length:#x} but the file at {ctx.io.real_size:#x}")
        ctx.reference(h.log_offset, h.log_offset + h.log_length)


def _header_content(h: Header) -> tuple:
    return (h.file_write_guid, h.data_write_guid, h.log_guid, h.log_version, h.version, h.log_length, h.log_offset)


# --- §2.3 log --------------------------------------------------------------------------------------
def _check_log(ctx: CheckContext) -> None:
    h = ctx.header
    if h is None or h.log_guid == c.ZERO_GUID or any(f.code == "HEADER_LOG_PLACEMENT" for f in ctx.findings):
        return
    where = h.log_offset
    try:
        log = read_log(ctx.io, h.log_offset, h.log_length, h.log_guid)
    except VhdxError as exc:
        ctx.add(Severity.ERROR, "LOG_NO_VALID_SEQUENCE", "Log", where, f"log cannot be read: {exc.message}")
        return
    ctx.log = log
    for pos in log.torn:
        ctx.add(Severity.WARNING, "LOG_TORN_ENTRY", "Log entry", h.log_offset + pos,
                "an entry with the current log GUID is incomplete or fails its checksum (never applied)",
                repairable=True)
    if not log.sequence:
        ctx.add(Severity.WARNING, "LOG_NO_VALID_SEQUENCE", "Log", where,
                f"the header names log GUID {h.log_guid} but no complete log sequence exists (nothing to replay)",
                repairable=True)
        return
    head = log.sequence[-1]
    if log.violation is not None:
        ctx.add(Severity.ERROR, "LOG_INVALID", "Log entry", log.violation.entry_offset,
                f"{log.violation.message}; the log is not replayed (not even in memory) and no repair replays it")
        return
    if log.problem:
        ctx.add(Severity.ERROR, "LOG_TRUNCATED", "Log", where + head.log_offset, log.problem)
        return
    entries = (f"{len(log.sequence)} log entr{'y' if len(log.sequence) == 1 else 'ies'} (sequence "
               f"{log.sequence[0].sequence_number}..{head.sequence_number})")
    if ctx.in_use:
        # A live writer's log is how it works, not damage: it empties the log when it closes the file.
        ctx.add(Severity.INFO, "LOG_IN_USE", "Log", where + log.sequence[0].log_offset,
                f"{entries} of the process writing the file; replayed in memory to check the structures below")
    else:
        ctx.add(Severity.ERROR, "LOG_DIRTY", "Log", where + log.sequence[0].log_offset,
                f"{entries} must be replayed; structures below are checked as replayed", repairable=True)
    ctx.io.overlay = overlay_for(log.plan)


# --- §2.2.3 region tables --------------------------------------------------------------------------
def _region_problem_code(problem: str) -> str:
    if problem.startswith("checksum"):
        return "REGION_TABLE_CHECKSUM"
    if problem.startswith("entry count"):
        return "REGION_TABLE_ENTRY_COUNT"
    return "REGION_TABLE_SIGNATURE"


def _region_rules(ctx: CheckContext, copy: RegionTableCopy, record: bool) -> int:
    """Check the entries of one region table copy; returns the number of problems (recorded if ``record``)."""
    problems = 0

    def add(code, offset, message):
        nonlocal problems
        problems += 1
        if record:
            ctx.add(Severity.ERROR, code, copy.name, offset, message)

    def entry_offset(i):
        return copy.offset + c.REGION_TABLE_HEADER_SIZE + i * c.REGION_ENTRY_SIZE

    for guid, name in c.KNOWN_REGIONS.items():
        where = [i for i, e in enumerate(copy.entries) if e.guid == guid]
        if not where:
            add("REGION_MISSING", copy.offset, f"the {name} region is missing")
        elif len(where) > 1:
            add("REGION_DUPLICATE", entry_offset(where[1]), f"the {name} region appears {len(where)} times")
    h = ctx.header
    spans = [("log", h.log_offset, h.log_offset + h.log_length, copy.offset)] if h and h.log_length else []
    for i, e in enumerate(copy.entries):
        if e.file_offset % c.ALIGNMENT or e.length % c.ALIGNMENT or e.file_offset < c.HEADER_SECTION_SIZE \
                or e.length == 0:
            add("REGION_ALIGNMENT", entry_offset(i),
                f"{e.name} region at {e.file_offset:#x} length {e.length:#x} is not a non-empty 1 MiB-aligned "
                "span after the header section")
        if e.end > ctx.size:
            add("REGION_BEYOND_EOF", entry_offset(i),
                f"{e.name} region ends at {e.end:#x} but the file at {ctx.size:#x}")
        if e.required and e.guid not in c.KNOWN_REGIONS:
            add("REGION_UNKNOWN_REQUIRED", entry_offset(i), f"unknown region {e.guid} is marked required")
        spans.append((f"{e.name} region", e.file_offset, e.end, entry_offset(i)))
    spans.sort(key=lambda s: s[1])
    for (name_a, _, end_a, _), (name_b, start_b, _, where_b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            add("REGION_OVERLAP", where_b, f"{name_b} overlaps {name_a}")
    return problems


def _check_region_tables(ctx: CheckContext) -> None:
    copies = []
    for i, off in enumerate(c.REGION_TABLE_OFFSETS):
        raw = ctx.io.read_at(off, c.REGION_TABLE_SIZE)
        try:
            copies.append(parse_region_table_copy(raw, i))
        except VhdxError as exc:
            copies.append(RegionTableCopy(i, off, raw, (), f"bad signature ({exc.message})"))
    ctx.region_copies = tuple(copies)
    valid = [copy for copy in copies if copy.valid]
    good = [copy for copy in valid if _region_rules(ctx, copy, record=False) == 0]
    for copy in copies:
        if not copy.valid:
            ctx.add(Severity.ERROR, _region_problem_code(copy.problem), copy.name, copy.offset,
                    copy.problem + ("; the other copy is good" if good else ""), repairable=bool(good))
    if not valid:
        return
    used = valid[0]  # the reader's choice: the first copy with a good signature and checksum
    if len(valid) == 2 and valid[0].raw != valid[1].raw:
        ctx.add(Severity.ERROR, "REGION_TABLE_MISMATCH", valid[1].name, valid[1].offset,
                "the two region table copies differ", repairable=bool(good))
    _region_rules(ctx, used, record=True)
    if used not in good and good:
        # The reader would use the bad copy; the repaired file will use the good one, so check on with it.
        used = good[0]
    ctx.regions = used.entries
    for e in used.entries:
        if e.file_offset >= c.HEADER_SECTION_SIZE and e.length:
            ctx.reference(e.file_offset, e.end)
    bats = [e for e in used.entries if e.guid == c.BAT_REGION_GUID]
    metas = [e for e in used.entries if e.guid == c.METADATA_REGION_GUID]
    ctx.bat_region = bats[0] if len(bats) == 1 else None
    ctx.metadata_region = metas[0] if len(metas) == 1 else None


# --- §2.6 metadata ---------------------------------------------------------------------------------
def _check_metadata(ctx: CheckContext) -> None:
    region = ctx.metadata_region
    if region is None or region.length < c.METADATA_TABLE_SIZE or region.file_offset < c.HEADER_SECTION_SIZE:
        return
    raw = ctx.io.read_at(region.file_offset, c.METADATA_TABLE_SIZE)
    table_ok = raw[:8] == c.METADATA_SIGNATURE
    count = int.from_bytes(raw[10:12], "little")
    if count > c.METADATA_TABLE_MAX_ENTRIES:
        ctx.add(Severity.ERROR, "METADATA_ENTRY_COUNT", "Metadata Table", region.file_offset,
                f"entry count {count} > {c.METADATA_TABLE_MAX_ENTRIES}")
        return
    entries = []
    for i in range(count):
        start = 32 + i * c.METADATA_ENTRY_SIZE
        e = parse_bytes(layouts.MetadataTableEntry, raw[start : start + 32], offset=region.file_offset + start)
        entries.append(MetadataEntry(e.item_id, e.offset, e.length, e.flags, region.file_offset + start))
    ctx.metadata_entries = tuple(entries)
    if sum(e.is_user for e in entries) > c.METADATA_MAX_USER_ENTRIES:
        ctx.add(Severity.ERROR, "METADATA_ENTRY_COUNT", "Metadata Table", region.file_offset,
                f"more than {c.METADATA_MAX_USER_ENTRIES} user items")
    in_bounds, seen, items = [], set(), {}
    for e in entries:
        if e.length > c.METADATA_ITEM_MAX_LENGTH or (e.length and (
                e.offset < c.METADATA_TABLE_SIZE or e.offset + e.length > region.length)):
            ctx.add(Severity.ERROR, "METADATA_ITEM_BOUNDS", "Metadata Table Entry", e.table_offset,
                    f"{e.name} at region offset {e.offset:#x} length {e.length} lies outside the item area")
        elif e.length:
            in_bounds.append(e)
        key = (e.item_id, e.is_user)
        if key in seen:
            ctx.add(Severity.ERROR, "METADATA_ITEM_DUPLICATE", "Metadata Table Entry", e.table_offset,
                    f"{e.name} appears more than once")
        seen.add(key)
        if e.item_id in KNOWN_ITEMS and not e.is_user:
            items.setdefault(e.item_id, e)
        elif e.is_required:
            ctx.add(Severity.ERROR, "METADATA_UNKNOWN_REQUIRED", "Metadata Table Entry", e.table_offset,
                    f"unknown metadata item {e.item_id} is marked required")
    in_bounds.sort(key=lambda e: e.offset)
    for a, b in zip(in_bounds, in_bounds[1:], strict=False):
        if b.offset < a.offset + a.length:
            ctx.add(Severity.ERROR, "METADATA_ITEM_OVERLAP", "Metadata Table Entry", b.table_offset,
                    f"{b.name} overlaps {a.name}")
    values, usable = {}, True
    for guid, (name, layout, size) in ITEM_LAYOUTS.items():
        e = items.get(guid)
        if e is None:
            ctx.add(Severity.ERROR, "METADATA_ITEM_MISSING", "Metadata Table", region.file_offset,
                    f"required item {name} is missing")
            usable = False
            continue
        if e.length != size:
            ctx.add(Severity.ERROR, "METADATA_ITEM_LENGTH", name, e.table_offset, f"length {e.length}, expected {size}")
            usable = False
            continue
        if e not in in_bounds:
            usable = False
            continue
        values[guid] = parse_bytes(layout, ctx.io.read_at(region.file_offset + e.offset, size),
                                   offset=region.file_offset + e.offset, structure=name)
    for guid, e in items.items():
        if e.flags & _FLAG_BITS != EXPECTED_ITEM_FLAGS[guid]:
            ctx.add(Severity.WARNING, "METADATA_FLAGS", KNOWN_ITEMS[guid], e.table_offset,
                    f"flags {e.flags:#x}, the spec gives {EXPECTED_ITEM_FLAGS[guid]:#x}", repairable=True)
    if not usable:
        _report_signature(ctx, table_ok, raw, region, repairable=False)
        return
    fp = values[c.FILE_PARAMETERS_GUID]
    has_parent = bool(fp.flags & c.FILE_PARAM_HAS_PARENT)
    params = DiskParameters(
        block_size=fp.block_size, leave_block_allocated=bool(fp.flags & c.FILE_PARAM_LEAVE_BLOCK_ALLOCATED),
        has_parent=has_parent, virtual_size=values[c.VIRTUAL_DISK_SIZE_GUID].virtual_disk_size,
        virtual_disk_id=values[c.VIRTUAL_DISK_ID_GUID].virtual_disk_id,
        logical_sector_size=values[c.LOGICAL_SECTOR_SIZE_GUID].logical_sector_size,
        physical_sector_size=values[c.PHYSICAL_SECTOR_SIZE_GUID].physical_sector_size,
        file_parameter_flags=fp.flags)
    problems = parameter_problems(params.block_size, params.logical_sector_size, params.physical_sector_size,
                                  params.virtual_size)
    _report_signature(ctx, table_ok, raw, region, repairable=not problems)
    if problems:
        ctx.add(Severity.ERROR, "METADATA_VALUE", "Metadata", region.file_offset, "; ".join(problems))
        return
    _check_locator(ctx, items.get(c.PARENT_LOCATOR_GUID), params, in_bounds)
    ctx.params = params
    ctx.geometry = Geometry(params.virtual_size, params.block_size, params.logical_sector_size, has_parent)


def _report_signature(ctx: CheckContext, table_ok: bool, raw: bytes, region: RegionEntry, *, repairable: bool):
    if not table_ok:
        ctx.add(Severity.ERROR, "METADATA_SIGNATURE", "Metadata Table", region.file_offset,
                f"signature {raw[:8]!r} instead of 'metadata'"
                + ("; every system item is intact" if repairable else ""), repairable=repairable)


def _check_locator(ctx: CheckContext, entry: MetadataEntry | None, params: DiskParameters, in_bounds) -> None:
    region = ctx.metadata_region
    if entry is None:
        if params.has_parent:
            ctx.add(Severity.ERROR, "LOCATOR_MISSING", "Metadata Table", region.file_offset,
                    "a differencing disk without a Parent Locator item")
        return
    where = region.file_offset + entry.offset
    if entry.length == 0 or entry not in in_bounds:
        if params.has_parent:
            ctx.add(Severity.ERROR, "LOCATOR_MALFORMED", "Parent Locator", entry.table_offset,
                    f"the parent locator item is empty or out of bounds (length {entry.length})")
        return
    try:
        locator = parse_parent_locator(ctx.io.read_at(where, entry.length), where)
    except VhdxError as exc:
        ctx.add(Severity.ERROR, "LOCATOR_MALFORMED", "Parent Locator", exc.offset, exc.message)
        return
    if not params.has_parent:
        return
    if locator.locator_type != c.VHDX_PARENT_LOCATOR_TYPE_GUID:
        ctx.add(Severity.ERROR, "LOCATOR_TYPE", "Parent Locator", where,
                f"locator type {locator.locator_type} is not the VHDX one")
        return
    if locator.get(c.PARENT_LINKAGE_KEY) is None or not locator.paths:
        missing = "parent_linkage" if locator.get(c.PARENT_LINKAGE_KEY) is None else "every parent path"
        ctx.add(Severity.ERROR, "LOCATOR_KEYS", "Parent Locator", where, f"{missing} is missing")
    ctx.locator = locator


# --- chain -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ParentProbe:
    data_write_guid: uuid.UUID
    params: DiskParameters
    identity: tuple | None


def _probe_parent(path: str) -> _ParentProbe:
    """Read just enough of a candidate parent to judge it: headers, (log), region table, metadata."""
    io = ImageIO.open(path)
    try:
        if io.read_at(0, len(c.FILE_SIGNATURE)) != c.FILE_SIGNATURE:
            raise VhdxError("not a VHDX file (it does not start with the 'vhdxfile' signature)", path=path)
        headers = load_headers(io)
        h = headers.current
        log = read_log(io, h.log_offset, h.log_length, h.log_guid)
        if log.needs_replay and log.refusal() is None:
            io.overlay = overlay_for(log.plan)
        regions = load_region_table(io, h.log_offset, h.log_length)
        metadata = load_metadata(io, regions.metadata)
        return _ParentProbe(h.data_write_guid, metadata.params, _identity(io))
    finally:
        io.close()


def _check_parent(ctx: CheckContext, options: CheckOptions, visited: tuple) -> str | None:
    """Find and judge the parent; returns its path when the chain goes on being checked (``options.chain``)."""
    locator = ctx.locator
    if locator is None:
        return None
    region = ctx.metadata_region
    entry = next(e for e in ctx.metadata_entries if e.item_id == c.PARENT_LOCATOR_GUID and not e.is_user)
    where = region.file_offset + entry.offset
    linkages = locator.linkages
    open_options = _chain.OpenOptions(parent=options.parent, search_dirs=options.search_dirs,
                                      ignore_id_mismatch=options.ignore_id_mismatch)
    tried, mismatched, found = [], [], None
    for cand in _chain.candidates(ctx.path, locator, open_options, options.parent):
        try:
            st = os.stat(cand.path)
        except OSError as exc:
            tried.append(f"{cand.path} ({exc.strerror})")
            continue
        except ValueError:  # e.g. a NUL inside the locator's path
            tried.append(f"{cand.path!r} (not a usable path)")
            continue
        if (st.st_dev, st.st_ino) in visited:
            ctx.add(Severity.ERROR, "CHAIN_LOOP", "Parent Locator", where,
                    f"the parent {cand.path} (from {cand.source}) is already part of this chain")
            return None
        try:
            probe = _probe_parent(cand.path)
        except VhdxError as exc:
            tried.append(f"{cand.path} (unreadable: {exc})")
            continue
        if probe.data_write_guid in linkages or (options.ignore_id_mismatch and not cand.name_only):
            found = (cand, probe)
            break
        tried.append(f"{cand.path} (DataWriteGuid {probe.data_write_guid} does not match)")
        if not cand.name_only:
            mismatched.append((cand, probe))
    if found is None:
        listing = "; ".join(tried) or "the locator holds no usable path"
        if mismatched:
            cand, probe = mismatched[0]
            ctx.add(Severity.ERROR, "PARENT_MISMATCH", "Parent Locator", where,
                    f"parent {cand.path} has DataWriteGuid {probe.data_write_guid}, the child expects "
                    f"{' or '.join(str(g) for g in linkages) or 'no linkage'}; tried: {listing}", repairable=True)
        else:
            ctx.add(Severity.ERROR, "PARENT_NOT_FOUND", "Parent Locator", where,
                    f"no locator path leads to the parent; tried: {listing}", repairable=True)
        return None
    cand, probe = found
    if probe.params.logical_sector_size != ctx.params.logical_sector_size:
        ctx.add(Severity.ERROR, "CHAIN_SECTOR_SIZE", "Logical Sector Size", where,
                f"the parent {cand.path} has {probe.params.logical_sector_size}-byte sectors, this file "
                f"{ctx.params.logical_sector_size}")
    if probe.params.virtual_size > ctx.params.virtual_size:
        ctx.add(Severity.ERROR, "CHAIN_VIRTUAL_SIZE", "Virtual Disk Size", where,
                f"the parent {cand.path} ({probe.params.virtual_size} bytes) is larger than this disk "
                f"({ctx.params.virtual_size} bytes)")
    if not options.chain:
        return None
    limit = _chain.depth_limit()
    if len(visited) >= limit:
        ctx.add(Severity.ERROR, "CHAIN_TOO_DEEP", "Parent Locator", where,
                f"{_chain.too_deep(limit).message}; the parent {cand.path} and its ancestors were not checked")
        return None
    return cand.path


# --- §2.5 BAT --------------------------------------------------------------------------------------
def _structure_spans(ctx: CheckContext) -> list[tuple[str, int, int]]:
    spans = [("the header section", 0, c.HEADER_SECTION_SIZE)]
    h = ctx.header
    if h is not None and h.log_length:
        spans.append(("the log", h.log_offset, h.log_offset + h.log_length))
    for e in ctx.regions:
        spans.append((f"the {e.name} region", e.file_offset, e.end))
    return spans


def _check_bat(ctx: CheckContext) -> None:
    g, region = ctx.geometry, ctx.bat_region
    if g is None or region is None or region.file_offset < c.HEADER_SECTION_SIZE:
        return
    needed = g.bat_entries
    if region.length < needed * c.BAT_ENTRY_SIZE:
        ctx.add(Severity.ERROR, "BAT_REGION_SIZE", "BAT", region.file_offset,
                f"region length {region.length} cannot hold {needed} entries ({needed * c.BAT_ENTRY_SIZE} bytes)")
    # Only what the file holds is examined; the rest of a truncated BAT is reported as REGION_BEYOND_EOF.
    n_entries = max(0, min(needed, region.length // c.BAT_ENTRY_SIZE,
                           (ctx.size - region.file_offset) // c.BAT_ENTRY_SIZE))
    scan = _BatScan(ctx, g, region, _structure_spans(ctx))
    stride = g.chunk_ratio + 1
    step = max(1, WINDOW_ENTRIES // stride) * stride
    buf = np.zeros(step, dtype=BAT_DTYPE)
    for lo in range(0, n_entries, step):
        hi = min(n_entries, lo + step)
        raw = buf[: hi - lo]
        ctx.io.readinto_at(region.file_offset + lo * c.BAT_ENTRY_SIZE, raw)
        scan.window(lo, raw)
    scan.finish()


class _BatScan:
    """BAT checks done window by window; what needs the whole BAT (overlaps, bitmaps) is gathered compactly."""

    def __init__(self, ctx: CheckContext, g: Geometry, region: RegionEntry, structures) -> None:
        self.ctx, self.g, self.region, self.structures = ctx, g, region, structures
        self.size = ctx.size
        self.diff = g.has_parent
        self.chunk_partial = np.zeros(g.sector_bitmap_blocks, dtype=bool)
        self.chunk_bitmap = np.zeros(g.sector_bitmap_blocks, dtype=bool)
        # Which BAT entry owns each 1 MiB granule of the file (EMPTY: none yet), to name both sides of an
        # overlap; entries found sharing space are gathered in ``clashes``.
        self.owner = np.full(ceil_div(ctx.io.real_size, c.ALIGNMENT), _EMPTY, dtype=np.uint32)
        self.clashes: list[np.ndarray] = []
        self.partner: dict[int, int] = {}
        legal = [s.value for s in c.BatState if s != c.BatState.PARTIALLY_PRESENT]
        self.legal_payload = np.array(legal + ([c.BatState.PARTIALLY_PRESENT] if self.diff else []), dtype=np.uint8)
        self.last_block_len = g.virtual_size - (g.data_blocks - 1) * g.block_size

    def _where(self, index: int) -> tuple[str, int]:
        stride = self.g.chunk_ratio + 1
        if index % stride == self.g.chunk_ratio:
            what = f"sector bitmap block {index // stride}"
        else:
            what = f"payload block {index - index // stride}"
        return f"BAT entry {index} ({what})", self.region.file_offset + index * c.BAT_ENTRY_SIZE

    def _report(self, mask: np.ndarray, index: np.ndarray, severity, code, message, repairable=False) -> None:
        hits = np.flatnonzero(mask)
        for i in hits[: MAX_FINDINGS_PER_CODE + 1].tolist():
            structure, offset = self._where(int(index[i]))
            self.ctx.add(severity, code, structure, offset, message(i), repairable=repairable)
        for _ in range(max(0, len(hits) - MAX_FINDINGS_PER_CODE - 1)):
            self.ctx._counts[code] = self.ctx._counts.get(code, 0) + 1

    def window(self, lo: int, raw: np.ndarray) -> None:
        g = self.g
        stride = g.chunk_ratio + 1
        # Payload entries 0..3 (no offset, no reserved bit, a state legal in every disk) need nothing more;
        # a sector bitmap entry needs a look whenever it is not 0. Everything below works on the rest only.
        active = raw > 3
        sb_pos = np.arange(g.chunk_ratio, len(raw), stride)
        active[sb_pos] = raw[sb_pos] != 0
        pos = np.flatnonzero(active)
        if not len(pos):
            return
        raw = raw[pos]
        index = pos.astype(np.int64) + lo
        is_sb = index % stride == g.chunk_ratio
        block = index - index // stride
        chunk = index // stride
        states = (raw & np.uint64(c.BAT_STATE_MASK)).astype(np.uint8)
        # FileOffsetMB has 44 bits: offsets past 2**62 would wrap negative in int64; clamp them far past EOF.
        offsets = np.minimum(raw & _OFFSET_MASK, np.uint64(1 << 62)).astype(np.int64)
        payload = ~is_sb & (block < g.data_blocks)
        # A block owns block_size bytes (Hyper-V allocates the last block whole even when the disk ends inside
        # it); only the part holding virtual disk bytes must lie inside the file.
        length = np.where(is_sb, c.SECTOR_BITMAP_BLOCK_SIZE, g.block_size).astype(np.int64)
        needed = np.where(~is_sb & (block == g.data_blocks - 1), self.last_block_len, length)
        ctx = self.ctx

        reserved = (raw & np.uint64(c.BAT_RESERVED_MASK)) != 0
        self._report(reserved & (payload | is_sb), index, Severity.WARNING, "BAT_RESERVED_BITS",
                     lambda i: f"reserved bits {int(raw[i]) & c.BAT_RESERVED_MASK:#x} are set", repairable=True)
        illegal = payload & ~np.isin(states, self.legal_payload)
        if self.diff:
            illegal |= is_sb & (states != c.SbState.NOT_PRESENT) & (states != c.SbState.PRESENT)
        self._report(illegal, index, Severity.ERROR, "BAT_STATE_ILLEGAL",
                     lambda i: f"state {states[i]} is not legal here in a {self._type_label()} disk")
        if not self.diff:
            # Only NOT_PRESENT is legal here. A PRESENT (6) entry is an error: QEMU takes it for a payload block
            # and refuses the file when it lies past the end; other stray values are harmless garbage.
            stray = is_sb & (states != c.SbState.NOT_PRESENT)
            for severity, mask in ((Severity.ERROR, stray & (states == c.SbState.PRESENT)),
                                   (Severity.WARNING, stray & (states != c.SbState.PRESENT))):
                self._report(mask, index, severity, "BAT_SB_IN_NON_DIFFERENCING",
                             lambda i: f"sector bitmap entry has state {states[i]} in a {self._type_label()} disk",
                             repairable=True)
        owned = (payload & np.isin(states, _PRESENT_STATES)) | (is_sb & (states == c.SbState.PRESENT) & self.diff)
        kept = payload & np.isin(states, _KEEPING_STATES) & (offsets > 0)
        if not self.diff:
            kept |= is_sb & (states != c.SbState.NOT_PRESENT) & (offsets > 0)
        # Only what lies beyond the virtual disk's end may be missing from the file (one rule with the reader).
        beyond = owned & np.where(is_sb, offsets + needed > self.size,
                                  payload_missing_bytes(g, block, offsets, self.size) > 0)
        end = np.minimum(offsets + length, self.size)
        self._report(beyond, index, Severity.ERROR, "BAT_BEYOND_EOF",
                     lambda i: f"block at {offsets[i]:#x} length {needed[i]:#x} ends past the end of the file "
                               f"({self.size:#x})")
        hits_structure = np.zeros(len(raw), dtype=bool)
        names = np.full(len(raw), -1, dtype=np.int16)
        for k, (_name, s_lo, s_hi) in enumerate(self.structures):
            hit = owned & (offsets < s_hi) & (end > s_lo)
            names[hit & ~hits_structure] = k
            hits_structure |= hit
        self._report(hits_structure, index, Severity.ERROR, "BAT_OVERLAPS_STRUCTURE",
                     lambda i: f"block at {offsets[i]:#x} overlaps {self.structures[names[i]][0]}")
        inside = owned & ~beyond & ~hits_structure
        start_mb = offsets // c.ALIGNMENT
        self._claim(start_mb[inside & is_sb], 1, index[inside & is_sb])
        self._claim(start_mb[inside & ~is_sb], g.block_size // c.ALIGNMENT, index[inside & ~is_sb])
        keep_ok = kept & (offsets + length <= self.size)
        for _name, s_lo, s_hi in self.structures:
            keep_ok &= ~((offsets < s_hi) & (offsets + length > s_lo))
        ctx.reference_blocks(start_mb[keep_ok & is_sb], 1)
        ctx.reference_blocks(start_mb[keep_ok & ~is_sb], g.block_size // c.ALIGNMENT)
        ctx.placed_blocks += int(np.count_nonzero(payload & ((inside & ~is_sb) | keep_ok)))
        if self.diff:
            partial = payload & (states == c.BatState.PARTIALLY_PRESENT)
            self.chunk_partial[(block[partial] // g.chunk_ratio)] = True
            sb_present = is_sb & (states == c.SbState.PRESENT) & ~beyond & ~hits_structure
            self.chunk_bitmap[chunk[sb_present]] = True

    def _type_label(self) -> str:
        p = self.ctx.params
        return p.disk_type.label

    def finish(self) -> None:
        g = self.g
        if self.diff:
            missing = self.chunk_partial & ~self.chunk_bitmap
            chunks = np.flatnonzero(missing)
            self._report(np.ones(len(chunks), dtype=bool), g.bitmap_index(chunks), Severity.ERROR,
                         "BAT_BITMAP_MISSING",
                         lambda i: f"chunk {chunks[i]} has partially present blocks but no usable sector bitmap block")
        if not self.clashes:
            return
        entries = np.unique(np.concatenate(self.clashes))
        partner = self.partner
        self._report(np.ones(len(entries), dtype=bool), entries, Severity.ERROR, "BAT_OVERLAP",
                     lambda i: f"block shares file space with "
                               f"{self._where(partner.get(int(entries[i]), int(entries[i])))[0]}")

    def _claim(self, start_mb: np.ndarray, length_mb: int, index: np.ndarray) -> None:
        """Record granules owned by blocks; a granule claimed twice is an overlap (both entries reported).

        Inside a window the granules are sorted to find blocks sharing one; across windows the owner map
        tells which earlier entry holds it.
        """
        owner = self.owner
        self.ctx.reference_blocks(start_mb, length_mb)
        for j in range(length_mb):
            units = start_mb + j
            keep = units < len(owner)
            units, idx = units[keep], index[keep].astype(np.uint32)
            order = np.argsort(units, kind="stable")
            units, idx = units[order], idx[order]
            same = np.flatnonzero(units[1:] == units[:-1])
            earlier = owner[units]
            taken = np.flatnonzero(earlier != _EMPTY)
            if len(same) or len(taken):
                for a, b in ((idx[same + 1], idx[same]), (idx[taken], earlier[taken])):
                    self.clashes.extend([a, b])
                    named = MAX_FINDINGS_PER_CODE
                    for x, y in zip(a[:named].tolist(), b[:named].tolist(), strict=True):
                        self.partner.setdefault(x, y)
                        self.partner.setdefault(y, x)
            owner[units] = idx


# --- leaks and free space --------------------------------------------------------------------------
def _fixed_reserve(ctx: CheckContext) -> int:
    """Bytes a fixed disk keeps for its blocks that have no file offset yet (QEMU writes them ZERO, offset 0)."""
    g = ctx.geometry
    if not ctx.params.leave_block_allocated or g.has_parent:
        return 0
    return min(max(0, g.data_blocks - ctx.placed_blocks) * g.block_size, g.virtual_size)


def _leak_floor(ctx: CheckContext, last_ref: int) -> int:
    """Where a leak may start: past the last referenced byte and past the space writers legitimately keep.

    QEMU leaves ``c.WRITER_LAYOUT_GAP`` after its structures before the first block, and a fixed disk whose
    blocks have no file offset yet (QEMU writes them ZERO) keeps their space after that; neither is a leak,
    and ``repair --leaks`` must never cut it.
    """
    floor = last_ref
    structures_end = max(hi for _name, _lo, hi in _structure_spans(ctx))
    if last_ref <= structures_end:  # no block after the structures: the writer's gap may follow them
        floor = structures_end + c.WRITER_LAYOUT_GAP
    return ceil_div(floor + _fixed_reserve(ctx), c.ALIGNMENT) * c.ALIGNMENT


def _check_leaks(ctx: CheckContext) -> None:
    """Unreferenced space (1 MiB granules): a tail of at least one block is a leak, the rest is free space.

    A crash while a block is being allocated leaves the file grown by a block that no BAT entry names: that is
    the leak (exit 3). Gaps between structures (QEMU leaves 4 MiB after its metadata, Windows leaves gaps,
    blocks freed inside the file) and short tails (Disk2VHD leaves 512 bytes) are free space, reclaimable by
    compaction only. Only files whose structures were read are examined.
    """
    # Only a map of trusted structures tells leaks apart; errors that a repair cannot fix make it untrusted.
    if ctx.geometry is None or ctx.bat_region is None or any(
            f.severity == Severity.ERROR and not f.repairable for f in ctx.findings):
        return
    size = ctx.io.real_size
    if ctx.space is None or not len(ctx.space):
        return
    used = np.flatnonzero(ctx.space)
    last_ref = min(size, (int(used[-1]) + 1) * c.ALIGNMENT) if len(used) else 0
    unreferenced = size - last_ref + int(np.count_nonzero(~ctx.space[: ceil_div(last_ref, c.ALIGNMENT)])) * c.ALIGNMENT
    start = max(last_ref, _leak_floor(ctx, last_ref))
    if size - start >= ctx.geometry.block_size:
        ctx.leaked_bytes = size - start
        ctx.add(Severity.LEAK, "LEAKED_SPACE", "File", start,
                f"{size - start} bytes at {start:#x}..{size:#x} at the end of the file are referenced by no "
                "structure (a block allocation that did not complete)", repairable=True)
    # A fixed disk's space kept for its unplaced blocks is payload, not free space.
    ctx.free_bytes = max(0, unreferenced - ctx.leaked_bytes - _fixed_reserve(ctx))


