"""Offline consistency check of a VHDX file (and optionally its whole chain): every problem as a Finding.

The check reads the structures itself with the low-level parsers instead of opening a ``VhdxImage``, so it
also works on files the reader refuses. It never raises for what it finds; only a file that cannot be read
at all (not a VHDX, I/O error) gives a report with ``checked = False``.

Order: file identifier, both headers, the log (a replayable log is applied in memory, as a reader would see
the file), both region tables, the metadata table and its items, the parent locator and the parent, the BAT
(numpy, in windows of whole chunks so a 64 Mi-entry BAT needs bounded memory), overlaps (by sorting block
offsets), and unreferenced space (a 1 MiB-granular map of the file minus every structure that references it):
free space between structures, or a leak when a tail of at least one block lies past everything referenced.
Last, the markers of an interrupted merge or resize/compaction next to the file (called explicitly: nothing
registers itself into check as an import side effect).

References: [MS-VHDX] §2.2 (header section), §2.3 (log), §2.5 (BAT), §2.6 (metadata, parent locator).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field, replace

import numpy as np

from vhdx.disk.image import foreign_file_reason
from vhdx.errors import VhdxError
from vhdx.findings import CODES, Code, Finding, Problem, Severity
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.ops import layout_journal
from vhdx.ops.check_chain import check_parent, file_identity
from vhdx.ops.merge.journal import report_interrupted_merge
from vhdx.structures.bat import BAT_DTYPE, WINDOW_ENTRIES, Geometry, ceil_div
from vhdx.structures.bat_rules import bat_problems, entry_name, structure_spans, windows
from vhdx.structures.header import Header, HeaderCopy, choose_current, header_problems, read_header_copies
from vhdx.structures.log import LogState, overlay_for, read_log
from vhdx.structures.metadata import DiskParameters, MetadataEntry, ParentLocator, scan_metadata
from vhdx.structures.region import (
    RegionEntry,
    RegionTableCopy,
    read_region_table_copies,
    region_problems,
    usable_copy,
)

# Findings of one code reported one by one; the rest are summed up in one more finding.
MAX_FINDINGS_PER_CODE = 32

_EMPTY = np.uint32(0xFFFFFFFF)



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
        if code not in CODES:
            raise ValueError(f"unknown finding code {code}")
        code = str(code)
        n = self._counts.get(code, 0)
        self._counts[code] = n + 1
        if n < MAX_FINDINGS_PER_CODE:
            self.findings.append(Finding(severity, code, structure, offset, message, self.path, repairable))

    def add_problems(self, problems: list[Problem]) -> None:
        """Record each problem a structure module reported."""
        for p in problems:
            self.add(p.severity, p.code, p.structure, p.offset, p.message, repairable=p.repairable)

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



def _report_interrupted_layout(ctx: CheckContext) -> None:
    """A ``.layout-journal`` next to the file: a resize or compaction stopped before its end (as MERGE_INTERRUPTED)."""
    try:  # check is read-only and must end: a record planted as a FIFO or device is named, never read
        st = os.stat(layout_journal.journal_path(ctx.path))
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_size > 2**20:
        ctx.add(Severity.WARNING, "LAYOUT_INTERRUPTED", "layout journal", None,
                "a resize or compaction record lies next to this disk but is not a regular file of a record's size")
        return
    try:
        journal = layout_journal.read_journal(ctx.path)
    except VhdxError as exc:
        ctx.add(Severity.WARNING, "LAYOUT_INTERRUPTED", "layout journal", None,
                f"a resize or compaction of this disk left a record that cannot be read ({exc.message})")
        return
    if journal is not None:
        ctx.add(Severity.WARNING, "LAYOUT_INTERRUPTED", "layout journal", None,
                f"a {journal.operation} of this disk stopped before its end; the disk reads the old or the new "
                f"bytes; finish it with `vhdx {journal.operation} --resume {ctx.path}`")


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


def _check_io(io: ImageIO, options: CheckOptions, visited: tuple) -> tuple[CheckReport, str | None, tuple]:
    ctx = CheckContext(io, io.path)
    if not _check_identifier(ctx):
        return CheckReport(io.path, tuple(ctx.findings), checked=False, file_size=io.real_size,
                           error=ctx.findings[-1].message), None, visited
    parent_path = None
    visited = (*visited, file_identity(io))
    ctx.in_use = not io.writable and io.writer_lock_held()
    if ctx.in_use:
        ctx.add(Severity.WARNING, "IN_USE", "File", None,
                "another process has the file open for writing; findings may be transient")
    _check_headers(ctx)
    _check_log(ctx)
    _check_region_tables(ctx)
    _check_metadata(ctx)
    if ctx.params is not None and ctx.params.has_parent:
        parent_path = check_parent(ctx, options, visited)
    _check_bat(ctx)
    _check_leaks(ctx)
    report_interrupted_merge(ctx)  # called, not registered: a fresh `vhdx check` has not imported the merge engine
    _report_interrupted_layout(ctx)
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
def _check_headers(ctx: CheckContext) -> None:
    copies = read_header_copies(ctx.io, exact=False)
    ctx.header_copies = copies
    ctx.add_problems(header_problems(copies, ctx.io.real_size))
    index = choose_current(copies)
    if index is None:
        return
    current = copies[index]
    ctx.header = current.header
    h = current.header
    if h.log_length and not any(f.code == Code.HEADER_LOG_PLACEMENT for f in ctx.findings):
        ctx.reference(h.log_offset, h.log_offset + h.log_length)


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
    ctx.add_problems(log.problems(ctx.in_use))
    if not log.needs_replay or log.refusal() is not None:
        return
    ctx.io.overlay = overlay_for(log.plan)


# --- §2.2.3 region tables --------------------------------------------------------------------------
def _check_region_tables(ctx: CheckContext) -> None:
    copies = read_region_table_copies(ctx.io, exact=False)
    ctx.region_copies = copies
    h = ctx.header
    log_offset, log_length = (h.log_offset, h.log_length) if h else (0, 0)
    ctx.add_problems(region_problems(copies, log_offset, log_length, ctx.size))
    # The reader would use a bad first copy; the repaired file will use the good one, so check on with it.
    used = usable_copy(copies, log_offset, log_length, ctx.size)
    if used is None:
        return
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
    scan = scan_metadata(ctx.io.read_at, region, ctx.path)
    ctx.add_problems(scan.problems)
    ctx.metadata_entries = scan.entries
    if scan.params is None or any(p.code == Code.METADATA_VALUE for p in scan.problems):
        return
    params = scan.params
    ctx.locator = scan.locator if params.has_parent else None
    ctx.params = params
    ctx.geometry = Geometry(params.virtual_size, params.block_size, params.logical_sector_size, params.has_parent)


# --- §2.5 BAT --------------------------------------------------------------------------------------
def _structure_spans(ctx: CheckContext) -> list[tuple[str, int, int]]:
    h = ctx.header
    return structure_spans(h.log_offset if h else 0, h.log_length if h else 0, ctx.regions)


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
    buf = np.zeros(min(n_entries, WINDOW_ENTRIES + g.chunk_ratio + 1), dtype=BAT_DTYPE)
    for lo, hi in windows(g, n_entries, WINDOW_ENTRIES):
        raw = buf[: hi - lo]
        ctx.io.readinto_at(region.file_offset + lo * c.BAT_ENTRY_SIZE, raw)
        scan.window(lo, raw)
    scan.finish()


class _BatScan:
    """BAT rules window by window (``bat_problems``); overlaps between blocks and the space map are check's own."""

    def __init__(self, ctx: CheckContext, g: Geometry, region: RegionEntry, structures) -> None:
        self.ctx, self.g, self.region, self.structures = ctx, g, region, structures
        # Which BAT entry owns each 1 MiB granule of the file (EMPTY: none yet), to name both sides of an
        # overlap; entries found sharing space are gathered in ``clashes``.
        self.owner = np.full(ceil_div(ctx.io.real_size, c.ALIGNMENT), _EMPTY, dtype=np.uint32)
        self.clashes: list[np.ndarray] = []
        self.partner: dict[int, int] = {}

    def _record(self, window) -> None:
        """Findings of one window: up to MAX_FINDINGS_PER_CODE + 1 each, the rest only counted."""
        ctx = self.ctx
        for p in window.problems(MAX_FINDINGS_PER_CODE + 1):
            ctx.add(p.severity, p.code, p.structure, p.offset, p.message, repairable=p.repairable)
        for rule, n in window.counts():
            extra = max(0, n - MAX_FINDINGS_PER_CODE - 1)
            ctx._counts[rule.code.value] = ctx._counts.get(rule.code.value, 0) + extra

    def window(self, lo: int, raw: np.ndarray) -> None:
        g, ctx = self.g, self.ctx
        w = bat_problems(g, lo, raw, ctx.size, bat_offset=self.region.file_offset, structures=self.structures,
                         disk_label=ctx.params.disk_type.label)
        self._record(w)
        inside = w.owned & ~w.beyond & ~w.overlapping
        start_mb = w.offsets // c.ALIGNMENT
        index = w.index[: len(w.raw)]
        self._claim(start_mb[inside & w.is_sb], 1, index[inside & w.is_sb])
        self._claim(start_mb[inside & ~w.is_sb], g.block_size // c.ALIGNMENT, index[inside & ~w.is_sb])
        keep_ok = w.kept & (w.offsets + w.length <= ctx.size)
        for _name, s_lo, s_hi in self.structures:
            keep_ok &= ~((w.offsets < s_hi) & (w.offsets + w.length > s_lo))
        ctx.reference_blocks(start_mb[keep_ok & w.is_sb], 1)
        ctx.reference_blocks(start_mb[keep_ok & ~w.is_sb], g.block_size // c.ALIGNMENT)
        ctx.placed_blocks += int(np.count_nonzero(w.payload & ((inside & ~w.is_sb) | keep_ok)))

    def _where(self, index: int) -> tuple[str, int]:
        return entry_name(self.g, index), self.region.file_offset + index * c.BAT_ENTRY_SIZE

    def finish(self) -> None:
        if not self.clashes:
            return
        entries = np.unique(np.concatenate(self.clashes))
        partner = self.partner
        for k, index in enumerate(entries.tolist()):
            if k > MAX_FINDINGS_PER_CODE:
                self.ctx._counts["BAT_OVERLAP"] = self.ctx._counts.get("BAT_OVERLAP", 0) + len(entries) - k
                break
            structure, offset = self._where(index)
            self.ctx.add(Severity.ERROR, "BAT_OVERLAP", structure, offset,
                         f"block shares file space with {self._where(partner.get(index, index))[0]}")

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


