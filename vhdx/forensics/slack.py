"""Slack space of a VHDX file: bytes that no structure references, where old data survives.

Areas reported, by category:
- ``identifier``, ``header-slot``, ``region-slot``, ``reserved``: the unused tails of the 64 KiB slots of the
  header section (file identifier after its creator string, each header after its 4 KiB, each region table
  after its last entry) and the 768 KiB reserved area before 1 MiB;
- ``log``: the whole log when it is empty (LogGuid zero), else the ring space outside the active sequence;
- ``metadata``: the metadata region outside its table entries and items; ``bat``: the BAT region after the
  last entry the geometry needs;
- ``stale-block``: a block whose BAT state holds no data (NOT_PRESENT, ZERO, UNMAPPED, UNDEFINED) but whose
  entry kept a file offset: the bytes left there are what the block held before;
- ``partial-block``: sectors of a PARTIALLY_PRESENT block whose bitmap bit is 0 (never read from this file);
  ``block-tail``: the part of the last block beyond the virtual disk's end;
- ``unreferenced``: space after 1 MiB owned by nothing (leaked blocks); ``file-tail``: space behind the
  last object of the file.

Content is read from the file as stored (an in-memory log replay only decides which structures are live).
Sparse holes are skipped without reading. Non-zero runs are located with 512-byte resolution by numpy and
trimmed to exact bytes at both ends.

References: [MS-VHDX] §2.2 (header section), §2.3 (log), §2.4 (sector bitmap), §2.5 (BAT), §2.6 (metadata).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from vhdx.disk.extents import ExtentKind, bitmap_runs
from vhdx.disk.image import VhdxImage
from vhdx.disk.zero_runs import rows_with_data
from vhdx.errors import InvalidRequestError, VhdxError
from vhdx.format import constants as c
from vhdx.structures.bat import allocated_mask, entry_offsets

SCAN_CHUNK = 8 * 1024 * 1024
# Unpacked sector bitmap bits (one byte each) read at a time for partially present blocks.
BITMAP_BITS = 1 << 24
GRAIN = 512
_IDENTIFIER_USED = len(c.FILE_SIGNATURE) + c.CREATOR_SIZE


@dataclass(frozen=True)
class SlackRegion:
    category: str
    start: int  # file offset
    length: int
    detail: str
    nonzero: tuple[tuple[int, int], ...]  # (file offset, length) of non-zero runs inside the region

    @property
    def nonzero_bytes(self) -> int:
        return sum(n for _, n in self.nonzero)


@dataclass(frozen=True)
class SlackReport:
    path: str
    file_size: int
    regions: tuple[SlackRegion, ...]
    extracted: tuple[str, ...] = ()

    @property
    def slack_bytes(self) -> int:
        return sum(r.length for r in self.regions)

    @property
    def nonzero_bytes(self) -> int:
        return sum(r.nonzero_bytes for r in self.regions)

    def to_json(self) -> dict:
        return {"path": self.path, "file_size": self.file_size, "slack_bytes": self.slack_bytes,
                "nonzero_bytes": self.nonzero_bytes, "extracted": list(self.extracted),
                "regions": [{"category": r.category, "start": r.start, "length": r.length, "detail": r.detail,
                             "nonzero_bytes": r.nonzero_bytes,
                             "nonzero": [{"start": s, "length": n} for s, n in r.nonzero]} for r in self.regions]}


# --- interval arithmetic (vectorised) --------------------------------------------------------------------
def _subtract(starts: np.ndarray, ends: np.ndarray, cut_starts: np.ndarray, cut_ends: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Parts of the ranges [starts, ends) covered by none of the cuts, merged where they touch."""
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if not len(starts):
        return starts, ends
    points = np.concatenate([starts, ends, cut_starts, cut_ends]).astype(np.int64)
    base = np.concatenate([np.ones(len(starts)), -np.ones(len(ends)), np.zeros(2 * len(cut_starts))])
    cuts = np.concatenate([np.zeros(2 * len(starts)), np.ones(len(cut_starts)), -np.ones(len(cut_ends))])
    order = np.argsort(points, kind="stable")
    points, base, cuts = points[order], np.cumsum(base[order]), np.cumsum(cuts[order])
    # Elementary segment i is [points[i], points[i+1]); the counts after all events at points[i] apply to it.
    last_at = np.append(points[1:] != points[:-1], True)
    seg_start = points[last_at][:-1]
    seg_end = points[last_at][1:]
    inside = (base[last_at][:-1] > 0) & (cuts[last_at][:-1] <= 0) & (seg_end > seg_start)
    s, e = seg_start[inside], seg_end[inside]
    if not len(s):
        return s, e
    join = np.append(True, s[1:] != e[:-1])
    first = np.flatnonzero(join)
    return s[first], np.append(e[first[1:] - 1], e[-1])


def _ranges(pairs) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(list(pairs), dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 0] + arr[:, 1]


# --- what the file holds ---------------------------------------------------------------------------------
def _log_active(image: VhdxImage) -> list[tuple[int, int]]:
    """File ranges of the log entries that a reader must still replay (none when the log is empty)."""
    log = image.log
    if not log.is_dirty or not log.sequence:
        return []
    out = []
    for entry in log.sequence:
        first = min(entry.entry_length, log.log_length - entry.log_offset)
        out.append((log.log_offset + entry.log_offset, first))
        if entry.entry_length > first:  # the entry wraps around the end of the ring
            out.append((log.log_offset, entry.entry_length - first))
    return out


@dataclass(frozen=True)
class _BlockFacts:
    """What slack needs of one file's BAT, gathered in one pass over the windows that hold entries."""

    owned_starts: np.ndarray  # file ranges of allocated payload blocks and present sector bitmaps (merged)
    owned_ends: np.ndarray
    stale_blocks: np.ndarray  # blocks that hold no data by state but kept a file offset inside the file
    stale_states: np.ndarray
    stale_offsets: np.ndarray
    partial_blocks: np.ndarray  # PARTIALLY_PRESENT blocks and their file offsets
    partial_offsets: np.ndarray


def _union(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ranges merged where they touch or overlap: a window of contiguous blocks becomes one range."""
    return _subtract(starts, ends, np.zeros(0, np.int64), np.zeros(0, np.int64))


def _block_facts(image: VhdxImage, size: int) -> _BlockFacts:
    """Owned, stale and partially present blocks of ``image``: windows of the BAT, never the whole array."""
    g, bat = image.geometry, image.bat
    own_s, own_e, stale, partial = [], [], [], []
    for win in bat.raw_windows():
        states, offsets = win.states(), entry_offsets(win.payload)
        allocated = allocated_mask(states)
        starts = offsets[allocated]
        if g.has_parent:
            bitmaps = win.present_bitmap_offsets()
            s, e = _union(np.concatenate([starts, bitmaps]),
                          np.concatenate([starts + g.block_size, bitmaps + c.SECTOR_BITMAP_BLOCK_SIZE]))
        else:
            s, e = _union(starts, starts + g.block_size)
        own_s.append(s)
        own_e.append(e)
        kept = ~allocated & (offsets >= c.HEADER_SECTION_SIZE) & (offsets < size)
        is_partial = states == c.BatState.PARTIALLY_PRESENT
        stale.append((np.flatnonzero(kept) + win.b0, states[kept], offsets[kept]))
        partial.append((np.flatnonzero(is_partial) + win.b0, offsets[is_partial]))

    def joined(arrays, dtype) -> np.ndarray:
        return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)

    return _BlockFacts(joined(own_s, np.int64), joined(own_e, np.int64),
                       joined([t[0] for t in stale], np.int64), joined([t[1] for t in stale], np.uint8),
                       joined([t[2] for t in stale], np.int64),
                       joined([t[0] for t in partial], np.int64),
                       joined([t[1] for t in partial], np.int64))


def find_slack_areas(image: VhdxImage) -> list[tuple[str, int, int, str]]:
    """(category, file offset, length, detail) of every slack area of one file, sorted by offset."""
    size = image.io.real_size
    g, bat = image.geometry, image.bat
    areas: list[tuple[str, int, int, str]] = []

    def add(category: str, starts, ends, detail: str = "") -> None:
        for s, e in zip(np.asarray(starts).tolist(), np.asarray(ends).tolist(), strict=True):
            e = min(e, size)
            if e > s:
                areas.append((category, s, e - s, detail))

    # Header section.
    hb = c.HEADER_BLOCK_SIZE
    add("identifier", [c.FILE_IDENTIFIER_OFFSET + _IDENTIFIER_USED], [c.FILE_IDENTIFIER_OFFSET + hb],
        "file identifier slot after the creator string")
    for i, off in enumerate(c.HEADER_OFFSETS):
        add("header-slot", [off + c.HEADER_SIZE], [off + hb], f"header {i + 1} slot after its 4 KiB")
    for copy in image.regions.copies:
        if copy.valid:
            used = c.REGION_TABLE_HEADER_SIZE + c.REGION_ENTRY_SIZE * len(copy.entries)
            add("region-slot", [copy.offset + used], [copy.offset + hb],
                f"region table {copy.index + 1} after its {len(copy.entries)} entries")
    add("reserved", [c.REGION_TABLE_OFFSETS[1] + hb], [c.HEADER_SECTION_SIZE], "reserved area of the header section")

    # Log: everything but the active sequence.
    log = image.log
    act_s, act_e = _ranges(_log_active(image))
    s, e = _subtract(np.array([log.log_offset]), np.array([log.log_offset + log.log_length]), act_s, act_e)
    add("log", s, e, "log space outside the active entries" if log.is_dirty and log.sequence else
        "log (empty: every byte is left over from earlier sessions)")

    # Metadata region: outside the table's entries and the items.
    md = image.metadata
    region = md.region
    used = [(region.file_offset, c.METADATA_TABLE_HEADER_SIZE + c.METADATA_ENTRY_SIZE * len(md.entries))]
    used += [(region.file_offset + en.offset, en.length) for en in md.entries if en.length]
    us, ue = _ranges(used)
    s, e = _subtract(np.array([region.file_offset]), np.array([region.end]), us, ue)
    add("metadata", s, e, "metadata region outside the table entries and items")

    # BAT region after the entries the geometry needs.
    add("bat", [bat.file_offset + g.bat_entries * c.BAT_ENTRY_SIZE], [image.regions.bat.end],
        "BAT region after its last entry")

    facts = _block_facts(image, size)
    fixed_s, fixed_e = _ranges([(0, c.HEADER_SECTION_SIZE), (image.log.log_offset, image.log.log_length),
                                *((r.file_offset, r.length) for r in image.regions.entries)])
    own_s, own_e = np.concatenate([fixed_s, facts.owned_starts]), np.concatenate([fixed_e, facts.owned_ends])

    # Blocks that hold no data by state but kept a file offset.
    stale_s = facts.stale_offsets
    stale_e = stale_s + g.block_size
    for b, value, st, en in zip(facts.stale_blocks.tolist(), facts.stale_states.tolist(), stale_s.tolist(),
                                stale_e.tolist(), strict=True):
        s, e = _subtract(np.array([st]), np.array([en]), own_s, own_e)
        add("stale-block", s, e, f"payload block {b} ({_state_name(value)}) kept this file offset")

    # Inside present blocks: sectors a partial block does not use, and the tail past the virtual disk's end.
    batch = max(1, BITMAP_BITS // g.sectors_per_block)  # unpacked bits of a batch stay bounded
    for i in range(0, len(facts.partial_blocks), batch):
        partial = facts.partial_blocks[i : i + batch]
        bits = image.read_bitmap_bits(partial)
        runs = bitmap_runs(1 - bits, partial * g.block_size, facts.partial_offsets[i : i + batch],
                           g.logical_sector_size)
        unused = runs.kind == ExtentKind.DATA  # bit 0 in the original bitmap
        ends = runs.file_offset[unused] + runs.length[unused]
        add("partial-block", runs.file_offset[unused], ends, "sectors of a partially present block not in use")
    last = g.data_blocks - 1
    tail_len = g.data_blocks * g.block_size - g.virtual_size
    last_state, last_offset = bat.payload_range(last, last + 1) if last >= 0 else (np.zeros(0), np.zeros(0))
    if last >= 0 and tail_len and int(last_state[0]) in (c.BatState.FULLY_PRESENT, c.BatState.PARTIALLY_PRESENT):
        end_of_data = int(last_offset[0]) + g.block_size - tail_len
        add("block-tail", [end_of_data], [end_of_data + tail_len], f"payload block {last} beyond the virtual disk")

    # Owned by nothing at all.
    free_s, free_e = _subtract(np.array([c.HEADER_SECTION_SIZE]), np.array([size]),
                               np.concatenate([own_s, stale_s]), np.concatenate([own_e, stale_e]))
    last_object = int(max(own_e.max(), stale_e.max() if len(stale_e) else 0))
    for s, e in zip(free_s.tolist(), free_e.tolist(), strict=True):
        if s >= last_object:
            add("file-tail", [s], [e], "behind the last object of the file")
        else:
            add("unreferenced", [s], [e], "space no structure references (leaked blocks)")
    areas.sort(key=lambda a: a[1])
    return areas


def _state_name(value: int) -> str:
    try:
        return c.BatState(value).name
    except ValueError:
        return f"reserved state {value}"


# --- content ---------------------------------------------------------------------------------------------
def _data_segments(fd: int, start: int, end: int):
    """(offset, end) of the parts of [start, end) that are not sparse holes."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return  # ENXIO: nothing but a hole up to the end of the file
        if data >= end:
            return
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError:
            hole = end
        hole = min(max(hole, data + 1), end)
        yield data, hole
        pos = hole


def nonzero_runs(fd: int, start: int, length: int) -> list[tuple[int, int]]:
    """(offset, length) of the non-zero byte runs in [start, start + length) of a file.

    Runs are exact at both ends; runs separated by less than a 512-byte grain of zeros count as one.
    """
    runs: list[list[int]] = []
    buf = bytearray(SCAN_CHUNK)
    for seg_start, seg_end in _data_segments(fd, start, start + length):
        pos = seg_start
        while pos < seg_end:
            n = min(SCAN_CHUNK, seg_end - pos)
            view = memoryview(buf)[:n]
            got = os.preadv(fd, [view], pos)
            data = np.frombuffer(buf, dtype=np.uint8, count=got)
            full = got // GRAIN * GRAIN
            grains = rows_with_data(data[:full].view(np.uint64).reshape(-1, GRAIN // 8))
            if full < got:
                grains = np.append(grains, data[full:].any())
            change = np.flatnonzero(np.diff(np.concatenate(([False], grains, [False])).astype(np.int8)))
            for g0, g1 in zip(change[::2].tolist(), change[1::2].tolist(), strict=True):
                lo, hi = g0 * GRAIN, min(g1 * GRAIN, got)
                last_grain = (g1 - 1) * GRAIN
                first = pos + lo + int(np.flatnonzero(data[lo : lo + GRAIN])[0])
                end = pos + last_grain + int(np.flatnonzero(data[last_grain:hi])[-1]) + 1
                if runs and first - runs[-1][1] < GRAIN:
                    runs[-1][1] = end  # continues a run of the previous chunk
                else:
                    runs.append([first, end])
            if got < n:
                break
            pos += n
    return [(s, e - s) for s, e in runs]


def find_slack(image: VhdxImage, *, extract_dir: str | os.PathLike | None = None) -> SlackReport:
    """Slack areas of one file with their non-zero content; optionally copy each non-zero run to a file."""
    path = image.path
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise VhdxError(f"cannot open: {exc.strerror}", path=path) from None
    try:
        regions = []
        for category, start, length, detail in find_slack_areas(image):
            regions.append(SlackRegion(category, start, length, detail, tuple(nonzero_runs(fd, start, length))))
        extracted = _extract(fd, path, regions, extract_dir) if extract_dir is not None else ()
        return SlackReport(os.path.abspath(path), os.fstat(fd).st_size, tuple(regions), extracted)
    finally:
        os.close(fd)


def _extract(fd: int, path: str, regions, extract_dir) -> tuple[str, ...]:
    out_dir = os.fspath(extract_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InvalidRequestError(f"{out_dir} exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    if os.path.samefile(os.path.dirname(os.path.abspath(path)), out_dir):
        raise InvalidRequestError("extract to a folder other than the evidence's own")
    base = os.path.basename(path)
    written = []
    for region in regions:
        for start, length in region.nonzero:
            name = os.path.join(out_dir, f"{base}.{region.category}.{start:#014x}.bin")
            try:
                out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise InvalidRequestError(f"{name} exists (extract into an empty folder)") from None
            try:
                done = 0
                while done < length:
                    chunk = os.pread(fd, min(SCAN_CHUNK, length - done), start + done)
                    if not chunk:
                        break
                    os.write(out, chunk)
                    done += len(chunk)
            finally:
                os.close(out)
            written.append(name)
    return tuple(written)


def find_chain_slack(image: VhdxImage, *, extract_dir=None) -> list[SlackReport]:
    """Slack of every layer file of the chain (only ``image`` itself when it was opened as an orphan)."""
    return [find_slack(layer, extract_dir=extract_dir) for layer in image.layers]
