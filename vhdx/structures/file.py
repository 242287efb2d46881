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
from dataclasses import dataclass

from vhdx.errors import FormatError, VhdxError
from vhdx.findings import Code
from vhdx.format import constants as c
from vhdx.format import foreign, layouts
from vhdx.io import ImageIO
from vhdx.lazy import np
from vhdx.structures import bat_rules
from vhdx.structures.bat import Bat, Geometry
from vhdx.structures.bat_rules import Refusals, bat_problems, structure_spans
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
    return FormatError(reason, structure="File Type Identifier", offset=c.FILE_IDENTIFIER_OFFSET, code="NOT_VHDX")


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
                from vhdx.structures.commit import replay_log_on_disk  # noqa: PLC0415 - rare; reads never need it

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
        """Refuse BATs that would make reads wrong, one window at a time, by the rules check reports.

        ``bat_problems`` judges each window (the one BAT rule set); state counts are gathered on the way. Windows
        of one repeated entry that owns no space (a sparse 64 TiB disk, a qemu-made BAT of ZERO entries) are judged
        once by that entry (``uniform_stops_no_reader``), not entry by entry, and the few entries that differ in
        such a window (blocks written) one by one (``exception_stops_no_reader``); a window either cannot clear
        is judged whole.
        """
        g, bat, h = self.geometry, self.bat, self.headers.current
        structures = structure_spans(h.log_offset, h.log_length, self.regions.entries)
        stride = g.chunk_ratio + 1
        counts, bitmaps, invented, refusals = [0] * 8, 0, [], Refusals()
        for window in bat.raw_windows():
            counts = [a + b for a, b in zip(counts, window.state_counts(), strict=True)]
            bitmaps += window.present_bitmaps()
            if (window.common is not None and not window.has_bitmaps()
                    and bat_rules.uniform_stops_no_reader(window.common, g)
                    and all(bat_rules.exception_stops_no_reader(g, index, entry, self.io.size, structures)
                            for index, entry in window.exception_indexes())):
                continue  # judged by its one value and its few exceptions: a qemu-made BAT is never split
            judged = bat_problems(g, window.k0 * stride, window.entries, self.io.size, bat_offset=bat.file_offset,
                                  structures=structures, disk_label=self.params.disk_type.label, salvage=salvage)
            refusals.add(judged)
            lost_at = np.flatnonzero(judged.beyond & ~judged.is_sb)
            if len(lost_at):  # --salvage: the missing bytes read as zeros, and every range so invented is listed
                blocks, lost = judged.block[lost_at], judged.missing[lost_at]
                ends = np.minimum((blocks + 1) * g.block_size, g.virtual_size)
                invented += zip((ends - lost).tolist(), lost.tolist(), strict=True)
        problem = refusals.refusal()  # the first rule broken anywhere, as one pass over the whole BAT names it
        if problem is not None:
            error = FormatError.from_problem(problem)
            if problem.code == Code.BAT_BEYOND_EOF and "sector bitmap" not in problem.structure:
                error.hint = "salvage"  # the missing payload could be read as zeros
            raise error
        bat.set_summary(counts, bitmaps)
        return tuple(invented)

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
