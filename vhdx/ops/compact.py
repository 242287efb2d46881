"""Compaction (Optimize-VHD offline): release blocks that read as zeros, move the rest down, truncate the file.

Modes, as Optimize-VHD names them: ``full`` (our default) releases blocks whose payload is all zeros and blocks
already trimmed (UNMAPPED/ZERO entries that still own file space); ``prezeroed`` only the zero blocks;
``pretrimmed`` only the trimmed ones; ``quick`` does what ``full`` does and also releases blocks that only hold
clusters the guest's file systems mark free (NTFS, FAT and ext2/3/4 through :mod:`vhdx.ops.guest_free`; every other
byte, the partition table and unread partitions included, is kept). Then every remaining payload block (and sector
bitmap block) is moved down into the lowest hole that holds it and the file is cut after its last structure.

Crash safety: a release is one change of BAT entries through the log (each released block read zeros before and
reads zeros after). A move copies the block into free space, flushes, and only then switches the BAT entry through
the log; the old space is reused only by a later move, after that commit. The file is truncated only once the log
is empty again (a log entry records the file size it needs). Any interruption leaves a disk that opens and reads
the same bytes; ``--resume`` runs what is left.

Quick mode changes what the disk reads (free clusters read zeros afterwards): it takes a new DataWriteGuid, is
refused on a disk other disks depend on (their guests may use those clusters), and on a differencing disk it does
not read the guest (releasing a child block would expose the parent's bytes there; only ``full``'s rules apply).

Differencing disks: a child block may be released only where the disk reads the same afterwards. A fully present
all-zero block becomes NOT_PRESENT only when its parent (through the chain) also reads zeros there; over parent
data it must stay (it hides that data). Partially present blocks are kept (their absent sectors come from the
parent). Trimmed entries keep their state (they read zeros whatever the parent holds) and only lose their space.

References: [MS-VHDX] §2.5.1 (BAT states), §2.3 (log), §2.6.2.1 (LeaveBlockAllocated).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from vhdx.disk.chain import OpenOptions
from vhdx.disk.extents import ExtentKind
from vhdx.disk.image import VhdxImage, open_image
from vhdx.disk.zero_runs import rows_with_data
from vhdx.errors import InvalidRequestError, UnsupportedError, VhdxError
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.ops import layout_journal as lj
from vhdx.ops.guest_free import read_free_map
from vhdx.ops.merge import find_dependents
from vhdx.structures.bat import (
    WINDOW_ENTRIES,
    allocated_mask,
    ceil_div,
    entry_offsets,
    entry_states,
    held_blocks,
    kept_space_mask,
    mark_units,
)
from vhdx.structures.header import load_headers
from vhdx.structures.log import read_log

MODES = ("full", "prezeroed", "pretrimmed", "quick")
GRANULE = c.ALIGNMENT
# Bytes read per zero scan step and moved per commit: large sequential I/O, bounded memory.
READ_SPAN = 64 * c.MiB
MOVE_SPAN = 256 * c.MiB

Opener = Callable[[str], ImageIO]
Progress = Callable[[int], None]


# --- opening and refusing ------------------------------------------------------------------------------
def open_for_layout(path, opener: Opener | None = None, *, parent=None, search_dirs=(),
                    resume: bool = False) -> VhdxImage:
    """Open a disk for a layout change: writer lock first, then refuse a dirty log instead of replaying it.

    When resuming our own interrupted operation the log is ours: it is replayed, and space the operation had
    appended but not yet referenced when it stopped is cut off the end of the file.
    """
    io = opener(os.fspath(path)) if opener else ImageIO.open(path, writable=True)
    try:
        header = load_headers(io).current
        log = read_log(io, header.log_offset, header.log_length, header.log_guid)
    except VhdxError as exc:
        io.close()
        raise exc.with_path(io.path) from None
    if log.is_dirty and not resume:
        io.close()
        raise VhdxError("the log holds updates not yet applied; run `vhdx repair` first", structure="Log",
                        offset=header.log_offset, path=io.path)
    # force: resize and compact look for dependents themselves (before any change, with their own wording), so
    # the writer's first-write refusal must not fire again once the caller has accepted them.
    options = OpenOptions(parent=os.fspath(parent) if parent else None,
                          search_dirs=tuple(os.fspath(d) for d in search_dirs), force=True)
    image = VhdxImage(io, options)
    if resume:
        truncate_to_structures(image)
    return image


def dependents_of(image: VhdxImage, search_dirs=()) -> list[str]:
    """Differencing disks next to ``image`` (or in ``search_dirs``) whose linkage names its DataWriteGuid."""
    folders = list(dict.fromkeys([os.path.dirname(os.path.abspath(image.path)), *map(os.fspath, search_dirs)]))
    return find_dependents(folders, [image.path]).get(image.data_write_guid, [])


def pending_journal(path, resume: bool, operation: str) -> lj.LayoutJournal | None:
    """The record to resume (``resume``), or None; refuses to start anew over an unfinished operation."""
    journal = lj.read_journal(path)
    if resume:
        if journal is None:
            raise InvalidRequestError("no interrupted resize or compaction of this disk to resume", path=str(path))
        if journal.operation != operation:
            raise InvalidRequestError(f"the interrupted operation is a {journal.operation}; resume it as a "
                                      f"{journal.operation}", path=str(path), hint="resume")
        return journal
    if journal is not None:
        raise InvalidRequestError(f"an interrupted {journal.operation} of this disk is pending; finish that "
                                  f"{journal.operation} first", path=str(path), hint="resume")
    return None


# --- the file's space ------------------------------------------------------------------------------------
def fixed_spans(image: VhdxImage) -> list[tuple[int, int]]:
    """(start, length) of the structures a compaction never moves: header section, log, BAT, metadata."""
    header = image.headers.current
    spans = [(0, c.HEADER_SECTION_SIZE), (header.log_offset, header.log_length)]
    spans += [(r.file_offset, r.length) for r in image.regions.entries]
    return spans


def occupancy(image: VhdxImage) -> np.ndarray:
    """One flag per 1 MiB granule of the file: True where some structure or block lives (one pass over windows)."""
    occupied = np.zeros(ceil_div(image.io.real_size, GRANULE), dtype=bool)
    for start, length in fixed_spans(image):
        mark_units(occupied, np.array([start]), length)
    for w in image.bat.raw_windows():
        states, offsets = entry_states(w.payload), entry_offsets(w.payload)
        mark_units(occupied, offsets[held_blocks(states, offsets)], image.block_size)
        mark_units(occupied, w.present_bitmap_offsets(), c.SECTOR_BITMAP_BLOCK_SIZE)
    return occupied


def structures_end(image: VhdxImage) -> int:
    """Where the file may end: past every structure, block and sector bitmap block it references."""
    ends = [start + length for start, length in fixed_spans(image)]
    ends.append(image.bat.held_end())
    return ceil_div(max(ends), GRANULE) * GRANULE


def _highest(image: VhdxImage, bitmaps: bool, above: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, offsets) of the ``count`` highest allocated blocks (or present sector bitmaps) past ``above``.

    Highest first: the only ones a round of ``pack`` can move (one pass over windows).
    """
    ids, offsets = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for w in image.bat.raw_windows():
        if bitmaps:
            off = entry_offsets(w.bitmap)
            sel = np.flatnonzero((entry_states(w.bitmap) == c.SbState.PRESENT) & (off > above))
            first = w.k0
        else:
            states, off = entry_states(w.payload), entry_offsets(w.payload)
            sel = np.flatnonzero(allocated_mask(states) & (off > above))
            first = w.b0
        ids.append(sel + first)
        offsets.append(off[sel])
        if sum(len(i) for i in ids) > 4 * count + WINDOW_ENTRIES:  # keep only the highest ``count`` so far
            ids, offsets = _top(np.concatenate(ids), np.concatenate(offsets), count)
            ids, offsets = [ids], [offsets]
    return _top(np.concatenate(ids), np.concatenate(offsets), count)


def _top(ids: np.ndarray, offsets: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-offsets, kind="stable")[:count]
    return ids[order].astype(np.int64), offsets[order]


def free_slots(occupied: np.ndarray, granules: int) -> np.ndarray:
    """File offsets of non-overlapping free spans of ``granules`` granules, lowest first."""
    edges = np.diff(np.concatenate(([0], (~occupied).astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    counts = (ends - starts) // granules
    total = int(counts.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    first = np.repeat(starts, counts)
    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return (first + within * granules).astype(np.int64) * GRANULE


def _moves(offsets: np.ndarray, slots: np.ndarray) -> int:
    """How many of the highest items (``offsets`` descending) go to the lowest slots, each strictly downwards."""
    n = min(len(offsets), len(slots))
    down = slots[:n] < offsets[:n]
    return int(np.argmin(down)) if not down.all() else n


def pack(image: VhdxImage, progress: Progress | None = None) -> int:
    """Move payload blocks, then sector bitmap blocks, down into holes until none fits; returns the moves.

    ``progress`` is called with the bytes moved so far.
    """
    writer = image.writer
    bs = image.block_size
    moved = moved_bytes = 0
    for size, bitmaps, move in ((bs, False, writer.move_blocks),
                                (c.SECTOR_BITMAP_BLOCK_SIZE, True, writer.move_bitmaps)):
        per_commit = max(1, MOVE_SPAN // size)
        while True:  # each round frees space the next round can use
            slots = free_slots(occupancy(image), size // GRANULE)
            if not len(slots):
                break
            # Only items above the lowest free slot can move down, and no more of them than there are slots.
            ids, offsets = _highest(image, bitmaps, int(slots[0]), len(slots))
            n = _moves(offsets, slots)
            if n == 0:
                break
            writer.begin(changes_data=False)
            for i in range(0, n, per_commit):
                j = min(i + per_commit, n)
                move(ids[i:j], slots[i:j])
                moved += j - i
                moved_bytes += (j - i) * size
                if progress:
                    progress(moved_bytes)
    return moved


def finish_session(image: VhdxImage) -> None:
    """Commit, empty the log, and re-read the structures (the next session starts from the file as it is)."""
    image.end_write_session()


def truncate_to_structures(image: VhdxImage) -> int:
    """Cut the file after its last structure (the log must be empty: entries record the size they need)."""
    end = structures_end(image)
    if image.io.real_size > end:
        image.io.truncate(end)
        image.io.flush()
    return image.io.real_size


# --- what can be released --------------------------------------------------------------------------------
def zero_blocks(image: VhdxImage, blocks: np.ndarray, progress: Progress | None = None) -> np.ndarray:
    """Mask over ``blocks`` (fully present) of those whose visible payload bytes are all zero.

    Reads contiguous runs of blocks in ``READ_SPAN`` steps and tests each block with one numpy reduction.
    """
    bs = image.block_size
    result = np.zeros(len(blocks), dtype=bool)
    if not len(blocks):
        return result
    offsets = entry_offsets(image.bat.entries_at(image.geometry.payload_index(blocks)))
    order = np.argsort(offsets, kind="stable")
    sorted_offsets = offsets[order]
    # Groups: runs of blocks adjacent in the file, cut every READ_SPAN bytes.
    run_start = np.concatenate(([True], np.diff(sorted_offsets) != bs))
    run_first = np.maximum.accumulate(np.where(run_start, np.arange(len(order)), 0))
    per = max(1, READ_SPAN // bs)
    starts = np.flatnonzero((np.arange(len(order)) - run_first) % per == 0).tolist() + [len(order)]
    buf = np.empty(per * bs, dtype=np.uint8)
    g = image.geometry
    last_block, visible_in_last = g.data_blocks - 1, g.virtual_size - (g.data_blocks - 1) * bs
    done = 0
    for lo, hi in zip(starts[:-1], starts[1:], strict=True):
        rows = buf[: (hi - lo) * bs]
        image.io.readinto_at(int(sorted_offsets[lo]), rows)
        rows = rows.reshape(hi - lo, bs)
        ids = blocks[order[lo:hi]]
        if visible_in_last < bs and (ids == last_block).any():
            rows[np.flatnonzero(ids == last_block), visible_in_last:] = 0  # bytes past the disk's end
        result[order[lo:hi]] = ~rows_with_data(rows.view(np.uint64))
        done += (hi - lo) * bs
        if progress:
            progress(done)
    return result


def parent_reads_zero(image: VhdxImage, blocks: np.ndarray) -> np.ndarray:
    """Mask over ``blocks``: the parent chain reads only zeros over each block's range."""
    parent = image.parent
    if parent is None or not len(blocks):
        return np.ones(len(blocks), dtype=bool)
    bs = image.block_size
    ext = parent.extents()
    data = ext.kind == ExtentKind.DATA
    touched = np.zeros(image.geometry.data_blocks, dtype=bool)
    for start, end in zip(ext.start[data].tolist(), ext.end[data].tolist(), strict=True):
        touched[start // bs : min(ceil_div(end, bs), len(touched))] = True
    result = ~touched[blocks]
    for i in np.flatnonzero(touched[blocks]).tolist():  # blocks over parent data: read what the parent has
        start = int(blocks[i]) * bs
        data_bytes = parent.read(start, min(bs, parent.virtual_size - start, image.virtual_size - start))
        result[i] = not np.frombuffer(data_bytes, dtype=np.uint8).any()
    return result


@dataclass
class Release:
    """Blocks a compaction lets go of, and what it keeps and why."""

    zero: np.ndarray  # fully present all-zero blocks -> NOT_PRESENT
    trimmed: np.ndarray  # zero-reading entries that still own space -> same state, no space
    kept_over_parent_data: int = 0  # differencing: zero blocks that hide parent data
    kept_partial: int = 0  # differencing: partially present blocks (not reclaimed)
    free: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # quick: guest-free -> NOT_PRESENT
    guest: list[str] = field(default_factory=list)  # quick: what was read of the guest, and what was skipped


def guest_free_blocks(image: VhdxImage, blocks: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Mask over ``blocks``: only free clusters of the guest's file systems in them; and what was read."""
    if image.has_parent:
        return np.zeros(len(blocks), dtype=bool), ["differencing disk: the guest file systems are not read (a "
                                                   "released block would show the parent's bytes)"]
    guest = read_free_map(image)
    return guest.free_blocks(blocks, image.block_size, image.virtual_size), guest.describe()


def plan_release(image: VhdxImage, mode: str, progress: Progress | None = None) -> Release:
    trimmed = np.zeros(0, dtype=np.int64)
    zero = np.zeros(0, dtype=np.int64)
    free = np.zeros(0, dtype=np.int64)
    guest: list[str] = []
    kept_parent = 0
    # One pass over the windows with data: the lists hold only blocks that own space.
    found_trimmed, found_full = [trimmed], [zero]
    for w in image.bat.raw_windows():
        states, offsets = entry_states(w.payload), entry_offsets(w.payload)
        found_trimmed.append(np.flatnonzero(kept_space_mask(states, offsets)) + w.b0)
        found_full.append(np.flatnonzero(states == c.BatState.FULLY_PRESENT) + w.b0)
    if mode in ("full", "pretrimmed", "quick"):
        trimmed = np.concatenate(found_trimmed).astype(np.int64)
    if mode in ("full", "prezeroed", "quick"):
        full = np.concatenate(found_full).astype(np.int64)
        if mode == "quick":
            in_free, guest = guest_free_blocks(image, full)
            free, full = full[in_free], full[~in_free]
        zero = full[zero_blocks(image, full, progress)]
        if image.has_parent:
            ok = parent_reads_zero(image, zero)
            kept_parent = int((~ok).sum())
            zero = zero[ok]
    partial = image.bat.summary.state_counts[c.BatState.PARTIALLY_PRESENT]
    return Release(zero, trimmed, kept_parent, partial, free, guest)


def apply_release(image: VhdxImage, release: Release) -> None:
    """One commit: zero blocks become NOT_PRESENT, trimmed entries give up their space."""
    writer = image.writer
    # Zero and trimmed releases keep the bytes the disk reads (children stay valid); guest-free ones do not.
    writer.begin(changes_data=bool(len(release.free)))
    if len(release.zero) or len(release.free):
        writer.set_payload(np.concatenate((release.zero, release.free)), c.BatState.NOT_PRESENT, 0)
    states = entry_states(image.bat.entries_at(image.geometry.payload_index(release.trimmed)))
    for state in np.unique(states).tolist():
        # v0.95's UNMAPPED (5) is read, never written: it becomes UNMAPPED (3).
        new_state = c.BatState.UNMAPPED if state == c.BatState.UNMAPPED_V095 else state
        writer.set_payload(release.trimmed[states == state], new_state, 0)
    writer.commit()


# --- the operation ------------------------------------------------------------------------------------------
@dataclass
class CompactResult:
    path: str
    mode: str
    dry_run: bool
    file_size_before: int
    file_size_after: int | None
    zero_blocks_released: int
    trimmed_blocks_released: int
    blocks_moved: int
    kept_over_parent_data: int
    kept_partial: int
    block_size: int
    warnings: list[str] = field(default_factory=list)
    free_blocks_released: int = 0  # quick: blocks holding only free guest clusters
    guest: list[str] = field(default_factory=list)  # quick: file systems and partitions read or skipped

    @property
    def bytes_released(self) -> int | None:
        return None if self.file_size_after is None else self.file_size_before - self.file_size_after

    def to_json(self) -> dict:
        return {**asdict(self), "bytes_released": self.bytes_released}


def compact_image(path, mode: str = "full", *, dry_run: bool = False, force: bool = False, resume: bool = False,
                  parent=None, search_dirs=(), opener: Opener | None = None,
                  progress: Progress | None = None) -> CompactResult:
    """Compact a dynamic or differencing disk in place (see the module docstring); ``dry_run`` changes nothing.

    Args:
        path: the disk.
        mode: ``full``, ``prezeroed``, ``pretrimmed`` or ``quick``.
        dry_run: report what would be released, change nothing.
        force: compact a disk that other disks depend on (their data stays valid: the DataWriteGuid is kept).
        resume: finish an interrupted compaction (its mode comes from the record).
        parent: the parent of a differencing disk, overriding its locator.
        search_dirs: more folders to look for parents (and for children) in.
        opener: opens the file for writing (tests inject faults through it).
        progress: called with counts of work done.
    """
    journal = pending_journal(path, resume, "compact") if not dry_run else None
    if journal is not None:
        mode = journal.mode
    if mode not in MODES:
        raise InvalidRequestError(f"unknown compaction mode {mode!r} (one of {', '.join(MODES)})")
    if dry_run:
        image = open_image(path, parent=parent, search_dirs=search_dirs)
    else:
        image = open_for_layout(path, opener, parent=parent, search_dirs=search_dirs, resume=journal is not None)
    with image:
        if image.disk_type == c.DiskType.FIXED:
            raise UnsupportedError("a fixed disk keeps every block allocated; make a dynamic copy to reclaim space",
                                   path=image.path, hint="dynamic_copy")
        warnings = []
        deps = dependents_of(image, search_dirs)
        if deps and not journal:
            text = f"{', '.join(deps)} depend{'s' if len(deps) == 1 else ''} on this disk"
            if mode == "quick" and not dry_run:
                raise InvalidRequestError(f"{text}; quick mode changes the bytes of free guest clusters, which their "
                                          "guests may use: refused even when forced", path=image.path,
                                          hint="mode_full")
            if not force and not dry_run:
                raise InvalidRequestError(f"{text}; compaction keeps the data and DataWriteGuid they rely on, but "
                                          "refuses to change a parent by default", path=image.path, hint="force")
            warnings.append(f"{text}; they stay valid (same data, same DataWriteGuid)")
        before = image.io.real_size
        release = plan_release(image, mode, progress)
        result = CompactResult(image.path, mode, dry_run, before, None, len(release.zero), len(release.trimmed), 0,
                               release.kept_over_parent_data, release.kept_partial, image.block_size, warnings,
                               len(release.free), release.guest)
        if dry_run:
            return result
        if journal is None:
            lj.write_journal(lj.LayoutJournal("compact", os.path.abspath(image.path), mode=mode))
        apply_release(image, release)
        result.blocks_moved = pack(image, progress)
        finish_session(image)
        result.file_size_after = truncate_to_structures(image)
    lj.remove_journal(path)
    return result
