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
from vhdx.structures.bat import BAT_DTYPE, Geometry, ceil_div
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


def _stage_entries(image: VhdxImage, bat_offset: int, entries: np.ndarray, first: int) -> None:
    """Stage (through the log) the entries from index ``first`` on, sector by sector where they change."""
    image.writer.stage_changed(bat_offset + first * c.BAT_ENTRY_SIZE, entries[first:].tobytes())


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
    step = 8 * c.MiB
    zeros = bytes(step)
    for pos in range(start, end, step):
        image.io.write_at(pos, zeros[: min(step, end - pos)])


def _grow(image: VhdxImage, size: int, result: ResizeResult) -> None:
    writer = image.writer
    writer.begin(changes_data=True)
    old, bat = image.geometry, image.bat
    bs = old.block_size
    new = Geometry(size, bs, old.logical_sector_size, old.has_parent)
    # Stale bytes past the old end in the old last block would read as data once the disk is larger (only the
    # part the new size shows; the rest stays past the end).
    last, tail = old.data_blocks - 1, old.virtual_size % bs
    if tail and bat.allocated_blocks()[last]:
        start = int(bat.offsets[last])
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
    entries = np.zeros(new.bat_entries, dtype=BAT_DTYPE)
    entries[: len(bat.entries)] = bat.entries
    if image.params.leave_block_allocated:
        blocks = np.arange(old.data_blocks, new.data_blocks, dtype=np.int64)
        if len(blocks):
            first = writer.allocate(len(blocks) * bs)
            offsets = np.uint64(first) + np.arange(len(blocks), dtype=np.uint64) * np.uint64(bs)
            entries[new.payload_index(blocks)] = offsets | np.uint64(c.BatState.FULLY_PRESENT)
    if bat_offset != region.file_offset:
        # A fresh copy at the end of the file: nothing references that space until the region tables do.
        image.io.write_at(bat_offset, entries.tobytes())
        _zero_file_span(image, bat_offset + entries.nbytes, bat_offset + bat_length)
    else:
        _stage_entries(image, bat_offset, entries, len(bat.entries))
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
    held = bat.allocated_blocks() | (np.isin(bat.states, c.ZERO_READING_STATES) & (bat.offsets > 0))
    in_way = held & (bat.offsets < hi) & (bat.offsets + bs > lo)
    sb_in_way = ((bat.bitmap_states == c.SbState.PRESENT) & (bat.bitmap_offsets < hi)
                 & (bat.bitmap_offsets + c.SECTOR_BITMAP_BLOCK_SIZE > lo))
    # The region takes all the space it frees, so no hole is left behind.
    end = max([hi, *(bat.offsets[in_way] + bs).tolist(),
               *(bat.bitmap_offsets[sb_in_way] + c.SECTOR_BITMAP_BLOCK_SIZE).tolist(),
               meta.end if move_meta else hi])
    writer.reserve_until(end)
    blocks = np.flatnonzero(in_way & bat.allocated_blocks())
    if len(blocks):
        writer.move_blocks(blocks, [writer.allocate(bs) for _ in range(len(blocks))])
    chunks = np.flatnonzero(sb_in_way)
    if len(chunks):
        writer.move_bitmaps(chunks, [writer.allocate(c.SECTOR_BITMAP_BLOCK_SIZE) for _ in range(len(chunks))])
    kept = np.flatnonzero(in_way & ~bat.allocated_blocks())
    states = bat.states[kept]
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
    if region.length > used:
        image.writer.begin(changes_data=False)
        image.writer.stage_changed(region.file_offset + used, bytes(region.length - used))
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
