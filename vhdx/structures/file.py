"""``VhdxFile``: the structures of one VHDX file, loaded by the one load sequence.

``VhdxFile.load`` reads, in this order: file identifier, both headers (current one chosen by CRC, version,
sequence), the log (a dirty log is replayed in memory for read-only opens, on disk for writable ones), both
region tables, the metadata, and (unless ``bat=False``) checks the BAT window by window. The image, check's
parent probe and ``read_structures`` load through it (repair still reads its structures step by step: each
repair must work on a file this loader refuses).

References: [MS-VHDX] §2.2-§2.6; §2.3.3 note <5> (in-memory replay on read-only opens).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

from vhdx.errors import FormatError, VhdxError
from vhdx.format import constants as c
from vhdx.format import foreign, layouts
from vhdx.io import ImageIO
from vhdx.structures.bat import (
    Bat,
    Geometry,
    RawWindow,
    entry_offsets,
    entry_states,
    payload_missing_bytes,
)
from vhdx.structures.header import HeaderSet, load_headers
from vhdx.structures.log import LogState, overlay_for, read_log
from vhdx.structures.metadata import DiskParameters, Metadata, load_metadata
from vhdx.structures.region import RegionTable, load_region_table


def foreign_file_reason(io: ImageIO) -> str | None:
    """'empty file ...' or 'this is a VHD (v1) disk ...' for a file that is not VHDX; None when we cannot tell."""
    size = io.real_size
    if size == 0:
        return "empty file (0 bytes), not VHDX"
    tail_at = max(size - foreign.TAIL_BYTES, 0)
    name = foreign.foreign_format(io.read_at(0, foreign.HEAD_BYTES), io.read_at(tail_at, size - tail_at))
    return f"this is {name}, not VHDX" if name else None


def _not_vhdx(io: ImageIO) -> FormatError:
    """Name an empty file or another disk format (VHD, qcow2, ...); otherwise say it is not VHDX.

    Never quote the bytes found: a parent locator can point at any file (/etc/shadow).
    """
    reason = foreign_file_reason(io) or "not a VHDX file (it does not start with the 'vhdxfile' signature)"
    return FormatError(reason, structure="File Type Identifier", offset=c.FILE_IDENTIFIER_OFFSET)


def _read_creator(io: ImageIO) -> str:
    try:
        return io.read_layout(layouts.FileIdentifier, c.FILE_IDENTIFIER_OFFSET).creator.rstrip("\x00")
    except FormatError:
        # The creator is diagnostic only: text that does not decode must not make the file unreadable.
        raw = io.read_at(c.FILE_IDENTIFIER_OFFSET + len(c.FILE_SIGNATURE), c.CREATOR_SIZE)
        return raw.decode("utf-16-le", "replace").split("\x00")[0]


@dataclass(eq=False)
class VhdxFile:
    """The structures of one file: identifier, headers, log state, regions, metadata and (lazily read) BAT."""

    io: ImageIO
    creator: str
    headers: HeaderSet
    log: LogState
    regions: RegionTable
    metadata: Metadata
    geometry: Geometry
    bat: Bat | None = None  # None when loaded with bat=False
    invented: tuple[tuple[int, int], ...] = ()  # (virtual offset, length) read as zeros by --salvage

    @classmethod
    def load(cls, io: ImageIO, *, bat: bool = True, salvage: bool = False, strict_log: bool = True) -> VhdxFile:
        """Load the structures of the file behind ``io`` (the one load sequence); ``io`` stays open.

        Args:
            io: the file (a writable one gets a pending log replayed on disk).
            bat: also check the BAT (window by window; it is read lazily afterwards).
            salvage: payload a truncated file lacks reads as zeros (listed in ``invented``) instead of refusing it.
            strict_log: refuse a log that cannot be replayed; False reads the file as it is (check's probe).
        """
        try:
            return cls._load(io, bat=bat, salvage=salvage, strict_log=strict_log)
        except VhdxError as exc:
            raise exc.with_path(io.path) from None

    @classmethod
    def _load(cls, io: ImageIO, *, bat: bool, salvage: bool, strict_log: bool) -> VhdxFile:
        if io.read_at(c.FILE_IDENTIFIER_OFFSET, len(c.FILE_SIGNATURE)) != c.FILE_SIGNATURE:
            raise _not_vhdx(io)
        creator = _read_creator(io)
        headers = load_headers(io)
        header = headers.current
        log = read_log(io, header.log_offset, header.log_length, header.log_guid)
        if log.needs_replay:
            refusal = log.refusal()
            if refusal is not None:
                if strict_log:
                    raise refusal
            elif io.writable:
                from vhdx.structures.commit import replay_log_on_disk  # the one log commit protocol

                headers = replay_log_on_disk(io, headers, log)
                log = LogState(header.log_offset, header.log_length, c.ZERO_GUID)
            else:
                # Read-only view of the replay: structures are read as if the log had been applied.
                io.overlay = overlay_for(log.plan)
        # A dirty log without any valid entry holds nothing that was applied (entries are durable before
        # their sectors are written), so the file reads correctly as it is; `check` reports it.
        regions = load_region_table(io, header.log_offset, header.log_length)
        metadata = load_metadata(io, regions.metadata)
        p = metadata.params
        geometry = Geometry(p.virtual_size, p.block_size, p.logical_sector_size, p.has_parent)
        loaded = cls(io, creator, headers, log, regions, metadata, geometry)
        if bat:
            loaded.bat = Bat.load(io, regions.bat, geometry)
            loaded.invented = loaded._check_bat(salvage)
        return loaded

    def _check_bat(self, salvage: bool) -> tuple[tuple[int, int], ...]:
        """Refuse BATs that would make reads wrong, one window at a time; counts are gathered on the way."""
        rules = BatOpenRules(self.geometry, self.io.size, salvage, self.params.disk_type.label, self.bat)
        counts, bitmaps = np.zeros(8, dtype=np.int64), 0
        for window in self.bat.raw_windows():
            window_counts = window.state_counts()
            rules.visit(window, window_counts)
            counts += window_counts
            bitmaps += int(np.count_nonzero(entry_states(window.bitmap) == c.SbState.PRESENT))
        rules.raise_first()
        self.bat.set_summary(counts, bitmaps)
        return tuple(rules.invented)

    # --- properties ---------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.io.path

    @property
    def params(self) -> DiskParameters:
        return self.metadata.params

    @property
    def virtual_size(self) -> int:
        return self.params.virtual_size

    @property
    def block_size(self) -> int:
        return self.params.block_size

    @property
    def logical_sector_size(self) -> int:
        return self.params.logical_sector_size

    @property
    def physical_sector_size(self) -> int:
        return self.params.physical_sector_size

    @property
    def disk_id(self) -> uuid.UUID:
        return self.params.virtual_disk_id

    @property
    def disk_type(self) -> c.DiskType:
        return self.params.disk_type

    @property
    def has_parent(self) -> bool:
        return self.params.has_parent

    @property
    def data_write_guid(self) -> uuid.UUID:
        return self.headers.current.data_write_guid

    @property
    def file_write_guid(self) -> uuid.UUID:
        return self.headers.current.file_write_guid

    @property
    def writable(self) -> bool:
        return self.io.writable


# Payload states an open accepts, by state value: PARTIALLY_PRESENT only where a parent supplies the rest.
_LEGAL_BASE = np.zeros(8, dtype=bool)
_LEGAL_BASE[[s.value for s in c.BatState if s != c.BatState.PARTIALLY_PRESENT]] = True
_LEGAL_DIFFERENCING = _LEGAL_BASE.copy()
_LEGAL_DIFFERENCING[c.BatState.PARTIALLY_PRESENT] = True
_ILLEGAL_BASE, _ILLEGAL_DIFFERENCING = ~_LEGAL_BASE, ~_LEGAL_DIFFERENCING

# Open-time BAT rules in the order a refusal names them (the first rule broken anywhere in the BAT wins).
_RULES = ("illegal_state", "inside_header", "beyond_eof", "bitmap_missing", "bitmap_outside")


@dataclass
class _Hits:
    first: int  # payload block or chunk of the first hit
    state: int  # its entry's state
    count: int = 0


@dataclass
class BatOpenRules:
    """The BAT rules an open enforces (illegal states, blocks outside the file, missing bitmaps), per window.

    Windows are visited in order; each rule keeps its first hit and a count, so the refusal is the one a pass
    over the whole BAT would give, in bounded memory. Only non-zero entries are examined: a zero entry is
    NOT_PRESENT, legal everywhere, and a 64 TiB disk has 67 million of them.
    """

    geometry: Geometry
    file_size: int
    salvage: bool
    disk_label: str
    bat: Bat
    invented: list[tuple[int, int]] = field(default_factory=list)
    hits: dict[str, _Hits] = field(default_factory=dict)

    def _note(self, rule: str, where: np.ndarray, states: np.ndarray) -> None:
        if not len(where):
            return
        hit = self.hits.setdefault(rule, _Hits(int(where[0]), int(states[0])))
        hit.count += len(where)

    def visit(self, win: RawWindow, counts: np.ndarray) -> None:
        """Apply the rules to one window (``counts``: its payload blocks per state)."""
        g, size = self.geometry, self.file_size
        legal = _LEGAL_DIFFERENCING if g.has_parent else _LEGAL_BASE
        # Whole-window passes only where the counts say a rule has something to find: a window of a 64 TiB
        # disk holds 256 Ki entries, nearly all NOT_PRESENT or ZERO.
        illegal = _ILLEGAL_DIFFERENCING if g.has_parent else _ILLEGAL_BASE
        if not counts[illegal].any() and not counts[c.BatState.FULLY_PRESENT] \
                and not counts[c.BatState.PARTIALLY_PRESENT]:
            self._visit_bitmaps(win, np.zeros(0, dtype=np.int64))
            return
        states = win.states()
        if counts[illegal].any():
            bad = np.flatnonzero(~legal[states])
            self._note("illegal_state", win.b0 + bad, states[bad])
        # Offsets are checked for allocated blocks only.
        allocated = np.flatnonzero((states == c.BatState.FULLY_PRESENT) | (states == c.BatState.PARTIALLY_PRESENT))
        present, present_states = win.b0 + allocated, states[allocated]
        offsets = entry_offsets(win.payload[allocated])
        inside = offsets < c.HEADER_SECTION_SIZE
        self._note("inside_header", present[inside], present_states[inside])
        # A block's virtual disk data must lie inside the file (one rule with check: bat.payload_missing_bytes).
        missing = payload_missing_bytes(g, present, offsets, size)
        beyond = missing > 0
        if beyond.any() and self.salvage:
            # --salvage: the missing bytes read as zeros, and every virtual range so invented is listed.
            lost_blocks, lost = present[beyond], missing[beyond]
            ends = np.minimum((lost_blocks + 1) * g.block_size, g.virtual_size)
            self.invented += zip((ends - lost).tolist(), lost.tolist(), strict=True)
        else:
            self._note("beyond_eof", present[beyond], present_states[beyond])
        self._visit_bitmaps(win, present[present_states == c.BatState.PARTIALLY_PRESENT])

    def _visit_bitmaps(self, win: RawWindow, partial_blocks: np.ndarray) -> None:
        g, size = self.geometry, self.file_size
        if g.has_parent:  # sector bitmap entries: differencing disks only
            chunks = win.k0 + np.arange(len(win.bitmap))
            sb_states = entry_states(win.bitmap)
            sb_offsets = entry_offsets(win.bitmap)
            sb_present = sb_states == c.SbState.PRESENT
            has_partial = np.zeros(len(win.bitmap), dtype=bool)
            has_partial[partial_blocks // g.chunk_ratio - win.k0] = True
            lacking = has_partial & ~sb_present
            self._note("bitmap_missing", chunks[lacking], sb_states[lacking])
            outside = sb_present & ((sb_offsets < c.HEADER_SECTION_SIZE)
                                    | (sb_offsets + c.SECTOR_BITMAP_BLOCK_SIZE > size))
            self._note("bitmap_outside", chunks[outside], sb_states[outside])

    def _message(self, rule: str, state: int) -> str:
        if rule == "illegal_state":
            return f"state {state} is not legal in a {self.disk_label} disk"
        if rule == "inside_header":
            return "block lies inside the header section"
        if rule == "beyond_eof":
            return (f"block lies beyond the end of the file ({self.file_size:#x}); truncated? "
                    "(--salvage reads the missing bytes as zeros)")
        if rule == "bitmap_missing":
            return "sector bitmap block missing for a partially present block"
        return "sector bitmap block lies outside the file"

    def raise_first(self) -> None:
        """Raise the refusal for the first rule broken anywhere (nothing when the BAT is fine)."""
        for rule in _RULES:
            hit = self.hits.get(rule)
            if hit is None:
                continue
            i = hit.first
            if rule.startswith("bitmap"):
                index = int(self.geometry.bitmap_index(i))
                structure = f"BAT entry {index} (sector bitmap block {i})"
            else:
                index = int(self.geometry.payload_index(i))
                structure = f"BAT entry {index} (payload block {i})"
            more = f" (and {hit.count - 1} more)" if hit.count > 1 else ""
            raise FormatError(self._message(rule, hit.state) + more, structure=structure,
                              offset=self.bat.entry_file_offset(index))
