"""Resize (Resize-VHD offline): grow or shrink the virtual disk of a dynamic or fixed VHDX in place.

Grow: the BAT gets entries for the new blocks (a fixed disk allocates and zero-fills them). When the BAT region is
too small it grows in place: the payload and sector bitmap blocks lying where it grows are first moved to the end
of the file (copy, flush, BAT entry switched through the log); when the log or metadata region lies there instead,
the BAT is rewritten at the end of the file and the region tables point at it. Bytes of the old last block past
the old end are zeroed first, so they cannot reappear as data.

Shrink: refused while bytes that are not zero lie past the new end, unless ``force`` (the result says how many it
cut). The entries past the end are cleared, the remaining blocks are moved down into the holes (as compaction
does) and the file is truncated.

Order, for crash safety: everything a step writes outside the log goes to space no committed structure references,
and is flushed before the log commit that makes it referenced; new BAT entries are committed before the metadata
and region table change that makes them part of the disk. So an interruption anywhere leaves the old or the new
size with its bytes, and ``--resume`` finishes (moves and truncation).

A differencing disk cannot change size alone (its size must match its parent's, as Hyper-V requires), and a disk
that has children is refused unless ``force``: the new DataWriteGuid a resize takes makes them refuse to open.

References: [MS-VHDX] §2.2.3 (region table), §2.5 (BAT), §2.6.2.2 (virtual disk size), §2.2.2 (DataWriteGuid).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from vhdx.disk.extents import ExtentKind
from vhdx.disk.image import VhdxImage, open_image
from vhdx.errors import InvalidRequestError, UnsupportedError
from vhdx.format import constants as c
from vhdx.format import layouts
from vhdx.ops import layout_journal as lj
from vhdx.ops.compact import (
    GRANULE,
    Opener,
    Progress,
    dependents_of,
    finish_session,
    open_for_layout,
    pack,
    pending_journal,
    truncate_to_structures,
)
from vhdx.ops.partitions import move_gpt_backup, read_partition_table
from vhdx.structures.bat import (
    BAT_DTYPE,
    WINDOW_ENTRIES,
    Geometry,
    allocated_mask,
    ceil_div,
    entry_offsets,
    entry_states,
    held_blocks,
)
from vhdx.structures.metadata import read_items

SCAN_STEP = 8 * c.MiB


@dataclass
class ResizeResult:
    path: str
    old_size: int
    new_size: int
    file_size_before: int
    file_size_after: int
    data_bytes_cut: int = 0  # bytes that were not zero past the new end (only with force)
    blocks_moved: int = 0
    bat_relocated: bool = False
    bat_grown: bool = False
    metadata_moved: bool = False
    gpt_backup_moved: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def check_new_size(image: VhdxImage, size: int) -> None:
    lss = image.logical_sector_size
    if size <= 0 or size % lss:
        raise InvalidRequestError(f"the new size {size} is not a positive multiple of the logical sector size ({lss})")
    if size > c.MAX_VIRTUAL_SIZE:
        raise InvalidRequestError(f"the new size {size} exceeds the VHDX maximum ({c.MAX_VIRTUAL_SIZE} bytes)")


def nonzero_beyond(image: VhdxImage, size: int, stop: int | None = None) -> tuple[int, int | None]:
    """(bytes that are not zero in [size, stop), first such virtual offset), reading only what the file holds."""
    stop = image.virtual_size if stop is None else stop
    if size >= stop:
        return 0, None
    ext = image.extents(size, stop, through_parents=False)
    count, first = 0, None
    buf = np.empty(SCAN_STEP, dtype=np.uint8)
    for start, length, kind, _layer, file_offset in ext.rows():
        if kind != ExtentKind.DATA:
            continue
        for pos in range(0, length, SCAN_STEP):
            n = min(SCAN_STEP, length - pos)
            image.io.readinto_at(file_offset + pos, buf[:n])
            nz = np.flatnonzero(buf[:n])
            if len(nz):
                count += len(nz)
                first = start + pos + int(nz[0]) if first is None else first
    return count, first


def minimum_size(image: VhdxImage) -> tuple[int, int]:
    """(smallest size keeping every partition and the GPT backup room, where the data scan past it stops).

    The scan stops before the old backup GPT at the end of a GPT disk: that copy is rewritten at the new end.
    """
    table = read_partition_table(image)
    if table.kind == "none":
        raise InvalidRequestError("shrinking to the end of the last partition needs a partition table (MBR or GPT) "
                                  "on the virtual disk", path=image.path)
    size = min(max(table.minimum_size, image.logical_sector_size), image.virtual_size)
    return size, image.virtual_size - table.gpt_backup_bytes


def _new_entries(image: VhdxImage, new: Geometry, first: int | None, e0: int, e1: int) -> np.ndarray:
    """Entries [e0, e1) of the grown BAT, past the old ones.

    Zeros, or for a fixed disk FULLY_PRESENT entries for the new blocks at consecutive offsets from ``first``
    (the space allocated for them).
    """
    entries = np.zeros(e1 - e0, dtype=BAT_DTYPE)
    if first is not None and image.params.leave_block_allocated:
        old_blocks = image.geometry.data_blocks
        stride = new.chunk_ratio + 1
        index = np.arange(e0, e1, dtype=np.int64)
        payload = (index % stride) != new.chunk_ratio
        blocks = index - index // stride
        new_block = payload & (blocks >= old_blocks) & (blocks < new.data_blocks)
        offsets = np.uint64(first) + (blocks[new_block] - old_blocks).astype(np.uint64) * np.uint64(new.block_size)
        entries[new_block] = offsets | np.uint64(c.BatState.FULLY_PRESENT)
    return entries


def _write_grown_entries(image: VhdxImage, new: Geometry, bat_offset: int, old_count: int, first: int | None,
                         relocated: bool) -> None:
    """Lay the grown BAT out, one window of entries at a time (bounded memory).

    In place: entries past the old ones are staged through the log where they change. Relocated: a fresh copy
    at ``bat_offset`` (nothing references that space until the region tables do) gets the old entries, read
    through the overlay, then the new ones.
    """
    step = WINDOW_ENTRIES
    if relocated:
        old_offset = image.regions.bat.file_offset
        for e0 in range(0, old_count, step):
            n = min(step, old_count - e0) * c.BAT_ENTRY_SIZE
            image.io.write_at(bat_offset + e0 * c.BAT_ENTRY_SIZE,
                              image.io.read_at(old_offset + e0 * c.BAT_ENTRY_SIZE, n))
    for e0 in range(old_count, new.bat_entries, step):
        e1 = min(new.bat_entries, e0 + step)
        entries = _new_entries(image, new, first, e0, e1)
        if relocated and not entries.any():  # NOT_PRESENT entries: a hole, not megabytes of zeros
            image.io.zero_range(bat_offset + e0 * c.BAT_ENTRY_SIZE, (e1 - e0) * c.BAT_ENTRY_SIZE)
        elif relocated:
            image.io.write_at(bat_offset + e0 * c.BAT_ENTRY_SIZE, entries.tobytes())
        else:
            image.writer.stage_changed(bat_offset + e0 * c.BAT_ENTRY_SIZE, entries)


def _stage_size_and_regions(image: VhdxImage, size: int, bat_offset: int, bat_length: int) -> None:
    """Stage the virtual disk size item and (when the BAT region changes) both region tables."""
    writer = image.writer
    bat = image.regions.bat
    if (bat_offset, bat_length) != (bat.file_offset, bat.length):
        writer.stage_region_change(c.BAT_REGION_GUID, bat_offset, bat_length)
    items = [replace(item, data=layouts.VirtualDiskSize.build({"virtual_disk_size": size}))
             if item.item_id == c.VIRTUAL_DISK_SIZE_GUID else item for item in read_items(image.io, image.metadata)]
    writer.rewrite_metadata(items)


def _zero_file_span(image: VhdxImage, start: int, end: int) -> None:
    image.io.zero_range(start, end - start)


def _grow(image: VhdxImage, size: int, result: ResizeResult) -> None:
    writer = image.writer
    writer.begin(changes_data=True)
    old, bat = image.geometry, image.bat
    bs = old.block_size
    new = Geometry(size, bs, old.logical_sector_size, old.has_parent)
    # Stale bytes past the old end in the old last block would read as data once the disk is larger (only the
    # part the new size shows; the rest stays past the end).
    last, tail = old.data_blocks - 1, old.virtual_size % bs
    state, start = bat.payload_at(last) if tail else (c.BatState.NOT_PRESENT, 0)
    if state in (c.BatState.FULLY_PRESENT, c.BatState.PARTIALLY_PRESENT):
        _zero_file_span(image, start + tail, start + min(bs, size - last * bs))
    region = image.regions.bat
    bat_offset, bat_length = region.file_offset, region.length
    need = ceil_div(new.bat_entries * c.BAT_ENTRY_SIZE, GRANULE) * GRANULE
    if need > region.length:
        result.bat_grown = True
        bat_offset, bat_length = _make_room_for_bat(image, need, result)
        # That ended a session (structures moved): start the next one from the file as it is now.
        writer, bat, region = image.writer, image.bat, image.regions.bat
        writer.begin(changes_data=True)
    first = None
    if image.params.leave_block_allocated and new.data_blocks > old.data_blocks:
        first = writer.allocate((new.data_blocks - old.data_blocks) * bs)
    relocated = bat_offset != region.file_offset
    _write_grown_entries(image, new, bat_offset, old.bat_entries, first, relocated)
    if relocated:
        _zero_file_span(image, bat_offset + new.bat_entries * c.BAT_ENTRY_SIZE, bat_offset + bat_length)
    writer.commit()  # first the entries (unused by the old size), then what makes them part of the disk
    _stage_size_and_regions(image, size, bat_offset, bat_length)
    writer.commit()


def _make_room_for_bat(image: VhdxImage, need: int, result: ResizeResult) -> tuple[int, int]:
    """Where a BAT of ``need`` bytes goes: grown in place or, when the log is in the way, at the end of the file.

    Growing in place moves what lies where the BAT grows to the end of the file: payload and sector bitmap blocks
    (``move_blocks``), and the metadata region (QEMU puts it right after the BAT): copied, then the region tables
    switched through the log. Ends the writer session (the caller starts a new one).
    """
    writer, bat = image.writer, image.bat
    region, meta = image.regions.bat, image.regions.metadata
    lo, hi = region.file_offset, region.file_offset + need
    header = image.headers.current

    def in_the_way(start: int, length: int) -> bool:
        return start < hi and lo < start + length

    fixed = [(header.log_offset, header.log_length), (0, c.HEADER_SECTION_SIZE)]
    fixed += [(r.file_offset, r.length) for r in image.regions.entries if r.guid not in c.KNOWN_REGIONS]
    if any(in_the_way(start, length) for start, length in fixed):
        result.bat_relocated = True
        offset = writer.allocate(need)
        writer.commit()
        return offset, need
    move_meta = in_the_way(meta.file_offset, meta.length)
    bs = image.block_size
    way = _in_the_way(bat, lo, hi)
    # The region takes all the space it frees, so no hole is left behind.
    end = max([hi, *(way.offsets + bs).tolist(), *(way.sb_offsets + c.SECTOR_BITMAP_BLOCK_SIZE).tolist(),
               meta.end if move_meta else hi])
    writer.reserve_until(end)
    allocated = allocated_mask(way.states)
    blocks = way.blocks[allocated]
    if len(blocks):
        writer.move_blocks(blocks, [writer.allocate(bs) for _ in range(len(blocks))])
    chunks = way.chunks
    if len(chunks):
        writer.move_bitmaps(chunks, [writer.allocate(c.SECTOR_BITMAP_BLOCK_SIZE) for _ in range(len(chunks))])
    kept = way.blocks[~allocated]
    states = way.states[~allocated]
    for state in np.unique(states).tolist():  # zero-reading entries there give up the space they kept
        writer.set_payload(kept[states == state], state, 0)
    writer.commit()
    result.blocks_moved += len(blocks) + len(chunks)
    if move_meta:
        result.metadata_moved = True
        writer.move_region(c.METADATA_REGION_GUID, writer.allocate(meta.length))  # fresh space: no log needed
    finish_session(image)
    # The space is unreferenced now: clear it (old block and metadata bytes) before the BAT takes it.
    if image.io.real_size < end:
        image.io.truncate(end)
    _zero_file_span(image, region.end, end)
    return lo, end - lo


@dataclass(frozen=True)
class _InTheWay:
    """Payload blocks holding file space in a range (with their states and offsets) and sector bitmaps there."""

    blocks: np.ndarray
    states: np.ndarray
    offsets: np.ndarray
    chunks: np.ndarray
    sb_offsets: np.ndarray


def _in_the_way(bat, lo: int, hi: int) -> _InTheWay:
    """What holds file space in [lo, hi): one pass over the BAT's windows with data."""
    bs = bat.geometry.block_size
    found: list[tuple[np.ndarray, ...]] = []
    for w in bat.raw_windows():
        states, offsets = entry_states(w.payload), entry_offsets(w.payload)
        sel = np.flatnonzero(held_blocks(states, offsets) & (offsets < hi) & (offsets + bs > lo))
        sb_states, sb_offsets = entry_states(w.bitmap), entry_offsets(w.bitmap)
        sb = np.flatnonzero((sb_states == c.SbState.PRESENT) & (sb_offsets < hi)
                            & (sb_offsets + c.SECTOR_BITMAP_BLOCK_SIZE > lo))
        found.append((sel + w.b0, states[sel], offsets[sel], sb + w.k0, sb_offsets[sb]))
    if not found:
        empty = np.zeros(0, np.int64)
        return _InTheWay(empty, empty.astype(np.uint8), empty, empty, empty)
    cols = [np.concatenate(col) for col in zip(*found, strict=True)]
    return _InTheWay(cols[0].astype(np.int64), cols[1], cols[2], cols[3].astype(np.int64), cols[4])


def _shrink(image: VhdxImage, size: int) -> None:
    writer = image.writer
    writer.begin(changes_data=True)
    old = image.geometry
    new = Geometry(size, old.block_size, old.logical_sector_size, old.has_parent)
    region = image.regions.bat
    _stage_size_and_regions(image, size, region.file_offset, region.length)
    writer.commit()
    clear_unused_entries(image, new)


def clear_unused_entries(image: VhdxImage, geometry: Geometry) -> None:
    """Zero the BAT region past the entries ``geometry`` reads, so a later grow cannot bring old blocks back."""
    region = image.regions.bat
    used = geometry.bat_entries * c.BAT_ENTRY_SIZE
    if region.length <= used:
        return
    # Window by window, and only where the file holds data: a 64 TiB BAT cut in half is mostly a hole.
    step = WINDOW_ENTRIES * c.BAT_ENTRY_SIZE
    image.writer.begin(changes_data=False)
    for start, stop in image.io.data_spans(region.file_offset + used, region.length - used):
        for pos in range(start, stop, step):
            image.writer.stage_changed(pos, bytes(min(step, stop - pos)))
    image.writer.commit()


def _check_dependents(image: VhdxImage, size: int, force: bool, search_dirs, result: ResizeResult) -> None:
    """Refuse to change the size under children, or (forced) warn that they will no longer open."""
    deps = dependents_of(image, search_dirs)
    if deps and size != image.virtual_size:
        text = f"{', '.join(deps)} depend{'s' if len(deps) == 1 else ''} on this disk"
        if not force:
            raise InvalidRequestError(f"{text}; a resize changes its size and DataWriteGuid, so "
                                      f"{'it' if len(deps) == 1 else 'they'} would no longer match (and refuse to "
                                      "open)", path=image.path, hint="force")
        result.warnings.append(f"{text}; they will no longer open (size and DataWriteGuid changed)")


def _check_cut(image: VhdxImage, size: int, scan_stop, force: bool, result: ResizeResult) -> None:
    """Refuse to cut data past the new size, or (forced) record and warn how much is cut."""
    cut, first = nonzero_beyond(image, size, scan_stop)
    if cut and not force:
        raise InvalidRequestError(f"{cut} bytes that are not zero lie past the new size (the first at virtual "
                                  f"offset {first})", path=image.path, hint="cut")
    result.data_bytes_cut = cut
    if cut:
        result.warnings.append(f"cut {cut} bytes of data past the new size (the first at offset {first})")


def resize_image(path, size: int | None = None, *, force: bool = False, dry_run: bool = False,
                 resume: bool = False, to_minimum: bool = False, search_dirs=(), opener: Opener | None = None,
                 progress: Progress | None = None) -> ResizeResult:
    """Set the virtual size of a dynamic or fixed disk (see the module docstring).

    Args:
        path: the disk.
        size: new virtual size in bytes (a multiple of the logical sector size); taken from the record on resume.
        force: cut data past a smaller size; resize a disk that has children (they will no longer open).
        dry_run: say what would happen, change nothing.
        resume: finish an interrupted resize.
        to_minimum: shrink to the end of the last partition (MBR or GPT, plus room for the GPT backup copy).
        search_dirs: more folders to look for children in.
        opener: opens the file for writing (tests inject faults through it).
        progress: called with counts of blocks moved.
    """
    journal = pending_journal(path, resume, "resize") if not dry_run else None
    if journal is not None:
        size, force = journal.size, journal.force
    if size is None and not to_minimum:
        raise InvalidRequestError("give the new size")
    image = open_image(path) if dry_run else open_for_layout(path, opener, resume=journal is not None)
    with image:
        if image.has_parent:
            raise UnsupportedError("a differencing disk cannot change size alone: its size must match its parent's "
                                   "(resize the base disk, then merge or recreate the checkpoints)", path=image.path)
        scan_stop = None
        if to_minimum:
            size, scan_stop = minimum_size(image)
        check_new_size(image, size)
        result = ResizeResult(image.path, image.virtual_size, size, image.io.real_size, image.io.real_size)
        _check_dependents(image, size, force, search_dirs, result)
        _check_cut(image, size, scan_stop, force, result)
        if dry_run:
            return result
        if journal is None:
            lj.write_journal(lj.LayoutJournal("resize", os.path.abspath(image.path), size=size, force=force))
        if size > image.virtual_size:
            _grow(image, size, result)
        elif size < image.virtual_size:
            _shrink(image, size)
        finish_session(image)
        if size < result.old_size or journal is not None:
            clear_unused_entries(image, image.geometry)  # a shrink interrupted before it cleared them
            result.blocks_moved += pack(image, progress)
            finish_session(image)
        if move_gpt_backup(image):
            result.gpt_backup_moved = True
            finish_session(image)
        result.file_size_after = truncate_to_structures(image)
    lj.remove_journal(path)
    return result
