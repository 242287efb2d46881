"""Writing to an open image: payload writes, zeroing, discard, and metadata updates through the log.

Order of a session, as the spec asks (§2.2.2.1, §2.3):
1. Before any other byte changes: a header update gives a new FileWriteGuid (and a new DataWriteGuid when the
   virtual disk's content is about to change).
2. Payload bytes go straight to their blocks; new blocks are appended at the end of the file (1 MiB aligned).
3. Metadata (BAT entries, sector bitmaps, metadata region) is held as pending 4 KiB sector images, visible to
   reads at once through the I/O overlay, and committed by ``flush`` through the log
   (``structures.commit.commit_through_log``, the one implementation of the protocol).
4. ``close`` commits and then clears the LogGuid, leaving both header copies with the session's content, so a
   cleanly closed file has an empty log.

A crash at any point leaves either the old or the new metadata: a log entry counts only once it is complete
(checksum), and is written before the header names its LogGuid and before any sector it carries is applied.
Every mutation of the image's structures goes through this class (``begin``, ``stage*``, ``set_*``,
``rewrite_metadata``, ``stage_region_change``, ``move_*``); the image re-reads them when a session ends.

References: [MS-VHDX] §2.2.2 (GUID rules), §2.3 (log), §2.4 (sector bitmap), §2.5 (BAT).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from vhdx.errors import DependentsError, InvalidRequestError, VhdxError
from vhdx.format import constants as c
from vhdx.io import Overlay, copy_range
from vhdx.structures.bat import WINDOW_ENTRIES, allocated_mask, ceil_div, entry_offsets, entry_states, mark_units
from vhdx.structures.commit import LogCursor, commit_through_log, empty_log, max_entry_sectors, replay_log_on_disk
from vhdx.structures.header import write_header_update
from vhdx.structures.log import SECTOR
from vhdx.structures.log_build import DataWrite
from vhdx.structures.metadata import layout_metadata_region, load_metadata
from vhdx.structures.region import build_region_table

if TYPE_CHECKING:
    from collections.abc import Callable

    from vhdx.disk.image import VhdxImage

_UNALLOCATED_STATES = (c.BatState.NOT_PRESENT, *c.ZERO_READING_STATES)
_ALLOCATED_STATES = (c.BatState.FULLY_PRESENT, c.BatState.PARTIALLY_PRESENT)
# Imported from here by the image loader and repair; they live with the commit protocol.
__all__ = ["Writer", "end_of_structures", "max_entry_sectors", "refuse_if_dependents", "replay_log_on_disk"]


def end_of_structures(image: VhdxImage) -> int:
    """First 1 MiB-aligned offset past every structure and block of ``image``: where new space starts."""
    ends = [image.io.real_size, image.regions.bat.end, image.regions.metadata.end,
            image.headers.current.log_offset + image.headers.current.log_length, image.bat.held_end()]
    return ceil_div(max(ends), c.ALIGNMENT) * c.ALIGNMENT


def _batches(first: int, last: int):
    """[b0, b1) runs of at most a window's worth of blocks: range updates in bounded memory."""
    for b0 in range(first, last, WINDOW_ENTRIES):
        yield b0, min(last, b0 + WINDOW_ENTRIES)


def refuse_if_dependents(image: VhdxImage) -> None:
    """Like Hyper-V, refuse to change the data of a disk that differencing disks depend on.

    The new DataWriteGuid would match no child's parent linkage, so they would refuse to open (and reading
    them over the changed parent would be wrong anyway). Looks in the file's folder and the search folders.
    """
    # Late: every open loads this module and `vhdx info` must not load the merge engine (tests/test_front_door.py);
    # vhdx.ops.merge.inputs also imports this module (a cycle at the top).
    from vhdx.ops.merge import find_dependents  # noqa: PLC0415 - the folder scan merge uses (metadata only)

    path = image.path
    if not os.path.isfile(path):
        return  # a stream without a folder
    folders = [os.path.dirname(os.path.abspath(path)), *image.options.search_dirs]
    children = find_dependents(list(dict.fromkeys(folders)), [path]).get(image.data_write_guid, [])
    if children:
        raise DependentsError(f"{', '.join(children)} depend{'s' if len(children) == 1 else ''} on this disk and "
                              "would no longer open after a write", path=path, dependents=children, hint="force")


class Writer:
    """Write state of one image opened for writing."""

    def __init__(self, image: VhdxImage) -> None:
        self.image = image
        self.io = image.io
        if self.io.overlay is None:
            self.io.overlay = Overlay()
        self.overlay = self.io.overlay
        self.pending: dict[int, bytes] = {}
        self.session_started = False
        self.data_guid_changed = False
        self.log = LogCursor()  # this session's log: LogGuid, sequence number, where the next entry goes
        # Source of the GUIDs this session writes (FileWriteGuid, DataWriteGuid, LogGuid); random by default,
        # replaced by a seeded callable where identical output is wanted (fixture builder).
        self.new_guid: Callable[[], uuid.UUID] = uuid.uuid4
        self._next_free: int | None = None
        # 1 MiB units of the file taken by allocated blocks and present bitmaps (see _reusable_offset); built on
        # first use by one pass over the BAT, kept current by set_payload/set_bitmap_entry.
        self._taken: np.ndarray | None = None
        # The file size every committed structure lies within, and whether a commit is under way: what an
        # abort may cut and whether the log may be marked empty (see ``abort``).
        self._durable_end = self.io.real_size
        self._committing = False

    # --- session and headers ------------------------------------------------------------------------
    def begin(self, changes_data: bool, data_write_guid: uuid.UUID | None = None) -> None:
        """Header update that must precede the session's first change (new FileWriteGuid/DataWriteGuid).

        ``data_write_guid`` fixes the new DataWriteGuid (a merge records it in the child's parent_linkage2
        before it changes the destination, spec note <12>); otherwise ``new_guid`` makes one.
        """
        image = self.image
        if self.session_started and (self.data_guid_changed or not changes_data):
            return
        if changes_data and not image.options.force:
            refuse_if_dependents(image)
        current = image.headers.current
        fresh = (data_write_guid or self.new_guid()) if changes_data else current.data_write_guid
        new = replace(current, data_write_guid=fresh)
        if not self.session_started:
            new = replace(new, file_write_guid=self.new_guid())
        # One copy now (it must precede any other change); the other gets the session's content when it ends.
        image.headers = write_header_update(self.io, image.headers, new)
        self.session_started = True
        self.data_guid_changed = self.data_guid_changed or changes_data

    # --- pending metadata ---------------------------------------------------------------------------
    def stage(self, file_offset: int, data: bytes) -> None:
        """Stage a metadata change of any length: whole 4 KiB sectors, read-modify-write at the edges."""
        if file_offset % SECTOR == 0 and len(data) == SECTOR:  # a whole sector (BAT updates): nothing to merge
            self.pending[file_offset] = bytes(data)
            self.overlay.set_sector(file_offset, bytes(data))
            return
        first = file_offset // SECTOR * SECTOR
        end = file_offset + len(data)
        last = ceil_div(end, SECTOR) * SECTOR
        current = bytearray(self.io.read_at(first, last - first))
        current[file_offset - first : end - first] = data
        for off in range(first, last, SECTOR):
            sector = bytes(current[off - first : off - first + SECTOR])
            self.pending[off] = sector
            self.overlay.set_sector(off, sector)

    def set_payload(self, blocks, state: int, offsets) -> None:
        """Change payload BAT entries (staged 4 KiB BAT sectors, visible to reads now, on disk at the next commit)."""
        blocks = np.atleast_1d(np.asarray(blocks, dtype=np.int64))
        offsets = np.broadcast_to(np.asarray(offsets, dtype=np.int64), blocks.shape)
        old = self.image.bat.set_payload(blocks, state, offsets, stage=self.stage)
        old_states, old_offsets = entry_states(old), entry_offsets(old)
        was = allocated_mask(old_states)
        self._track_taken(was, old_offsets, state in _ALLOCATED_STATES, offsets, self.image.block_size)

    def set_bitmap_entry(self, chunk: int, state: int, offset: int) -> None:
        old = self.image.bat.set_bitmap(chunk, state, offset, stage=self.stage)
        was = entry_states(old) == c.SbState.PRESENT
        self._track_taken(was, entry_offsets(old), state == c.SbState.PRESENT, np.array([offset]),
                          c.SECTOR_BITMAP_BLOCK_SIZE)

    def _track_taken(self, was: np.ndarray, old_offsets: np.ndarray, takes: bool, new_offsets: np.ndarray,
                     length: int) -> None:
        """Keep the session's map of taken file space current: new holdings marked, a released one forgets it."""
        if self._taken is None:
            return
        if np.any(was & ~(takes & (old_offsets == new_offsets))):
            self._taken = None  # space may have been freed: the next reuse check builds the map again
        elif takes:
            mark_units(self._taken, new_offsets, length)

    def set_bitmap_bits(self, block: int, first_sector: int, count: int, value: bool) -> None:
        """Set or clear ``count`` sector bits of payload block ``block`` starting at ``first_sector``."""
        g = self.image.geometry
        chunk = block // g.chunk_ratio
        sb_offset = self.image.bat.bitmap_at(chunk)[1]
        first_bit = (block % g.chunk_ratio) * g.sectors_per_block + first_sector
        end_bit = first_bit + count
        lo_byte, hi_byte = first_bit // 8, ceil_div(end_bit, 8)
        raw = np.frombuffer(self.io.read_at(sb_offset + lo_byte, hi_byte - lo_byte), dtype=np.uint8)
        bits = np.unpackbits(raw, bitorder="little")
        bits[first_bit - lo_byte * 8 : end_bit - lo_byte * 8] = 1 if value else 0
        self.stage(sb_offset + lo_byte, np.packbits(bits, bitorder="little").tobytes())

    # --- commit -------------------------------------------------------------------------------------
    def commit(self) -> None:
        """Make every pending change durable through the log; a no-op (but a flush) when nothing is pending."""
        self._committing = True
        self._commit()
        self._committing = False
        self._durable_end = max(self._durable_end, self.io.real_size)

    def _commit(self) -> None:
        self._extend_file()
        if not self.pending:
            self.io.flush()  # payload only
            return
        offsets = sorted(self.pending)
        writes = [DataWrite(off, self.pending[off]) for off in offsets]
        self.image.headers = commit_through_log(self.io, self.image.headers, writes, cursor=self.log,
                                                new_guid=self.new_guid)
        self.overlay.drop_sectors(offsets)
        self.pending.clear()

    def abort(self) -> None:
        """Forget what is pending (a ``with`` block that raised): nothing staged since the last commit is written.

        Payload written into new blocks since then is cut off again. When the failure struck inside a commit,
        the file is left exactly as it is: its log holds what the next open replays.
        """
        self.overlay.drop_sectors(list(self.pending))
        self.pending.clear()
        if self._committing:
            return
        if self.io.real_size > self._durable_end:
            self.io.truncate(self._durable_end)
        if self.session_started:
            # Every committed entry was applied and flushed: the log holds nothing left to replay.
            self.image.headers = empty_log(self.io, self.image.headers)

    def close(self) -> None:
        """Commit, then mark the log empty in both header copies (which then both hold the session's content)."""
        self.commit()
        if self.session_started:
            self.image.headers = empty_log(self.io, self.image.headers)

    # --- space --------------------------------------------------------------------------------------
    def _end_of_structures(self) -> int:
        return end_of_structures(self.image)

    def allocate(self, length: int) -> int:
        """Reserve ``length`` bytes (a multiple of 1 MiB) at the end of the file; they read as zeros."""
        if self._next_free is None:
            self._next_free = self._end_of_structures()
        offset = self._next_free
        self._next_free += length
        # The file grows once per commit (see _extend_file): a truncate per block made writes 2-5x slower.
        return offset

    def _file_end(self) -> int:
        """Size the file has, counting space allocated this session but not yet added to it."""
        return max(self.io.real_size, self._next_free or 0)

    def _extend_file(self) -> None:
        """Grow the file over every allocation, before any metadata that points at them is logged."""
        if self._next_free is not None and self.io.real_size < self._next_free:
            self.io.truncate(self._next_free)

    def _reusable_offset(self, block: int) -> int | None:
        """The file space a ZERO/UNMAPPED/UNDEFINED entry kept from its present days, if safe to reuse."""
        image = self.image
        offset = image.bat.payload_at(block)[1]
        if offset < c.HEADER_SECTION_SIZE or offset % c.ALIGNMENT or offset + image.block_size > self._file_end():
            return None
        spans = [(image.regions.bat.file_offset, image.regions.bat.end),
                 (image.regions.metadata.file_offset, image.regions.metadata.end),
                 (image.headers.current.log_offset,
                  image.headers.current.log_offset + image.headers.current.log_length)]
        if any(lo < offset + image.block_size and offset < hi for lo, hi in spans):
            return None
        if self._taken is None:
            self._taken = image.bat.taken_units(self._file_end())
        lo, hi = offset // c.ALIGNMENT, ceil_div(offset + image.block_size, c.ALIGNMENT)
        # Space past the map (allocated after it was built) counts as taken: never reused by mistake.
        if hi > len(self._taken) or self._taken[lo:hi].any():
            return None
        return offset

    def _ensure_bitmap(self, chunk: int) -> None:
        if self.image.bat.bitmap_at(chunk)[0] != c.SbState.PRESENT:
            self.set_bitmap_entry(chunk, c.SbState.PRESENT, self.allocate(c.SECTOR_BITMAP_BLOCK_SIZE))

    # --- virtual disk operations --------------------------------------------------------------------
    def _check_range(self, offset: int, length: int) -> None:
        size = self.image.virtual_size
        if offset < 0 or length < 0 or offset + length > size:
            raise InvalidRequestError(f"range {offset}+{length} is outside the virtual disk ({size} bytes)")

    def write(self, offset: int, data) -> int:
        """Write bytes at a virtual offset (any alignment); returns the byte count."""
        data = memoryview(data).cast("B")
        self._check_range(offset, len(data))
        if not len(data):
            return 0
        self.begin(changes_data=True)
        lss = self.image.logical_sector_size
        start, end = offset // lss * lss, ceil_div(offset + len(data), lss) * lss
        if (start, end) != (offset, offset + len(data)):
            # Sub-sector edges: merge with what the disk reads there now (through the chain).
            buf = bytearray(self.image.read(start, end - start))
            buf[offset - start : offset - start + len(data)] = data
            data, offset = memoryview(buf), start
        bs = self.image.block_size
        pos = 0
        while pos < len(data):
            block = (offset + pos) // bs
            in_block = (offset + pos) % bs
            n = min(bs - in_block, len(data) - pos)
            self._write_in_block(block, in_block, data[pos : pos + n])
            pos += n
        return len(data)

    def _write_in_block(self, block: int, in_block: int, data: memoryview) -> None:
        image = self.image
        g = image.geometry
        state, block_offset = image.bat.payload_at(block)
        lss = image.logical_sector_size
        block_len = min(g.block_size, g.virtual_size - block * g.block_size)
        covers_block = in_block == 0 and len(data) >= block_len
        if state in (c.BatState.FULLY_PRESENT, c.BatState.PARTIALLY_PRESENT):
            self.io.write_at(block_offset + in_block, data)
            if state == c.BatState.PARTIALLY_PRESENT:
                if covers_block:
                    self.set_payload(block, c.BatState.FULLY_PRESENT, block_offset)
                else:
                    self.set_bitmap_bits(block, in_block // lss, len(data) // lss, True)
                    self._promote_if_full(block)
            return
        if state not in _UNALLOCATED_STATES:
            raise VhdxError(f"cannot write into a block in reserved state {state}", structure=f"payload block {block}")
        reused = self._reusable_offset(block) if state != c.BatState.NOT_PRESENT else None
        if reused is not None:
            # Old bytes linger in reused space: what the write does not cover must read as zeros.
            self.io.write_at(reused, bytes(g.block_size))
            offset = reused
        else:
            offset = self.allocate(g.block_size)
        self.io.write_at(offset + in_block, data)
        if g.has_parent and state == c.BatState.NOT_PRESENT and not covers_block:
            # Only the written sectors belong to this file; the rest still comes from the parent.
            chunk = block // g.chunk_ratio
            self._ensure_bitmap(chunk)
            self.set_bitmap_bits(block, 0, g.sectors_per_block, False)
            self.set_bitmap_bits(block, in_block // lss, len(data) // lss, True)
            self.set_payload(block, c.BatState.PARTIALLY_PRESENT, offset)
        else:
            self.set_payload(block, c.BatState.FULLY_PRESENT, offset)

    def _promote_if_full(self, block: int) -> None:
        bits = self.image.read_bitmap_bits(np.array([block]))
        g = self.image.geometry
        valid = ceil_div(min(g.block_size, g.virtual_size - block * g.block_size), self.image.logical_sector_size)
        if bits[0, :valid].all():
            self.set_payload(block, c.BatState.FULLY_PRESENT, self.image.bat.payload_at(block)[1])

    def _whole_blocks(self, offset: int, length: int) -> tuple[int, int]:
        """Blocks entirely inside [offset, offset+length) (the last block counts whole up to the disk's end)."""
        g = self.image.geometry
        end = offset + length
        first = ceil_div(offset, g.block_size)
        last = end // g.block_size if end < g.virtual_size else g.data_blocks
        return first, max(first, last)

    def write_zeros(self, offset: int, length: int) -> None:
        """Make a range read as zeros: whole blocks become ZERO (fixed disks: zeros written), edges written."""
        self._check_range(offset, length)
        if length == 0:
            return
        g = self.image.geometry
        first, last = self._whole_blocks(offset, length)
        if first >= last or self.image.params.leave_block_allocated and not g.has_parent:
            self._write_zero_bytes(offset, length)
            return
        self.begin(changes_data=True)
        head_end = first * g.block_size
        tail_start = min(last * g.block_size, g.virtual_size)
        self._write_zero_bytes(offset, head_end - offset)
        self._write_zero_bytes(tail_start, offset + length - tail_start)
        # The entry keeps its file offset: the space stays owned by the block and is reused by its next write.
        for b0, b1 in _batches(first, last):
            offsets = self.image.bat.payload_range(b0, b1)[1]
            self.set_payload(np.arange(b0, b1, dtype=np.int64), c.BatState.ZERO, offsets)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        chunk = 8 * c.MiB
        while length > 0:
            n = min(chunk, length)
            self.write(offset, bytes(n))
            offset, length = offset + n, length - n

    def discard(self, offset: int, length: int) -> int:
        """Trim: blocks entirely inside the range become UNMAPPED (read as zeros); fixed disks ignore it.

        Partial blocks are left unchanged, as a discard is only a hint (qemu-io and guests expect the same).
        Returns the virtual bytes whose blocks changed state (0 for a fixed disk or when no whole block is in range).
        """
        self._check_range(offset, length)
        g = self.image.geometry
        if self.image.params.leave_block_allocated and not g.has_parent:
            return 0
        first, last = self._whole_blocks(offset, length)
        done = 0
        for b0, b1 in _batches(first, last):
            if self.image.bat.uniform_state(b0, b1) == c.BatState.UNMAPPED:
                continue
            states, offsets = self.image.bat.payload_range(b0, b1)
            change = np.flatnonzero(states != c.BatState.UNMAPPED)
            if not len(change):
                continue
            self.begin(changes_data=True)
            blocks = change + b0
            self.set_payload(blocks, c.BatState.UNMAPPED, offsets[change])
            ends = np.minimum((blocks + 1) * g.block_size, g.virtual_size)
            done += int((ends - blocks * g.block_size).sum())
        return done

    # --- layout changes (resize, compact) -----------------------------------------------------------
    def stage_changed(self, file_offset: int, data) -> None:
        """Like ``stage``, but only the 4 KiB sectors whose bytes differ from what reads there now.

        ``data`` is any buffer (bytes, or a numpy array of BAT entries: its bytes).
        """
        raw = np.frombuffer(data, dtype=np.uint8)
        if not raw.any() and not self.io.data_spans(file_offset, len(raw)):
            return  # zeros over a hole of the file (and nothing staged there): nothing changes
        first = file_offset // SECTOR * SECTOR
        end = file_offset + len(raw)
        current = np.empty(ceil_div(end, SECTOR) * SECTOR - first, dtype=np.uint8)
        self.io.readinto_data_at(first, current)  # a hole (a BAT region grown in place) is not read
        wanted = current.copy()
        wanted[file_offset - first : end - first] = raw
        differs = (current != wanted).reshape(-1, SECTOR).any(axis=1)
        for i in np.flatnonzero(differs).tolist():
            self.stage(first + i * SECTOR, wanted[i * SECTOR : (i + 1) * SECTOR].tobytes())

    def reserve_until(self, offset: int) -> None:
        """Make later allocations start at or after ``offset`` (space a structure is about to take)."""
        aligned = ceil_div(offset, c.ALIGNMENT) * c.ALIGNMENT
        self._next_free = max(self._next_free or self._end_of_structures(), aligned)

    def move_blocks(self, blocks, new_offsets) -> None:
        """Copy payload blocks to free file space, then switch their BAT entries there (one commit).

        The commit's payload flush makes the copies durable before its log entry. The old space is neither
        changed nor reused before the commit is durable, so a crash leaves either the old or the new mapping,
        both reading the same bytes.
        """
        bat = self.image.bat
        blocks = np.atleast_1d(np.asarray(blocks, dtype=np.int64))
        new_offsets = np.atleast_1d(np.asarray(new_offsets, dtype=np.int64))
        old = bat.entries_at(self.image.geometry.payload_index(blocks))
        self._copy_spans(entry_offsets(old), new_offsets, self.image.block_size)
        states = entry_states(old)
        for state in np.unique(states).tolist():
            sel = states == state
            self.set_payload(blocks[sel], state, new_offsets[sel])
        self.commit()

    def move_bitmaps(self, chunks, new_offsets) -> None:
        """Like ``move_blocks`` for sector bitmap blocks."""
        bat = self.image.bat
        chunks = np.atleast_1d(np.asarray(chunks, dtype=np.int64))
        new_offsets = np.atleast_1d(np.asarray(new_offsets, dtype=np.int64))
        self._copy_spans(entry_offsets(bat.entries_at(self.image.geometry.bitmap_index(chunks))), new_offsets,
                         c.SECTOR_BITMAP_BLOCK_SIZE)
        for chunk, offset in zip(chunks.tolist(), new_offsets.tolist(), strict=True):
            self.set_bitmap_entry(chunk, c.SbState.PRESENT, offset)
        self.commit()

    def stage_region_change(self, guid: uuid.UUID, file_offset: int, length: int) -> None:
        """Stage both region table copies with region ``guid`` placed at ``file_offset`` (``length`` bytes).

        ``image.regions`` keeps the old placement until the session ends and the structures are read again.
        """
        entries = [replace(e, file_offset=file_offset, length=length) if e.guid == guid else e
                   for e in self.image.regions.entries]
        table = build_region_table(entries)
        for offset in c.REGION_TABLE_OFFSETS:
            self.stage_changed(offset, table)

    def move_region(self, guid: uuid.UUID, new_offset: int) -> None:
        """Copy a region to fresh space (nothing references it yet), then switch both region tables to it (committed).

        The commit's payload flush makes the copy durable before the log entry that names it.
        """
        region = next(e for e in self.image.regions.entries if e.guid == guid)
        self.io.write_at(new_offset, self.io.read_at(region.file_offset, region.length))
        self.stage_region_change(guid, new_offset, region.length)
        self.commit()

    def _copy_spans(self, sources: np.ndarray, targets: np.ndarray, length: int) -> None:
        for src, dst in zip(sources.tolist(), targets.tolist(), strict=True):
            # A short last block (the file ends inside it) copies what the file holds.
            n = max(0, min(length, self.io.real_size - src))
            if self.io.fd is not None:
                copy_range(self.io, src, self.io.fd, dst, n)  # in the kernel where it can
            else:
                self.io.write_at(dst, self.io.read_at(src, n))
        # No flush here: the commit that switches the entries flushes payload (these copies) before its log entry.

    # --- metadata region ----------------------------------------------------------------------------
    def rewrite_metadata(self, items) -> None:
        """Lay the metadata region out anew with ``items`` and stage the 4 KiB sectors that change.

        The new region is read back before this returns; when it is refused (a malformed locator, say), the
        sectors are unstaged again, so a rejected region is never committed.
        """
        region = self.image.regions.metadata
        new = layout_metadata_region(items, region.length)
        old = self.io.read_at(region.file_offset, region.length)
        changed = [off for off in range(0, region.length, SECTOR) if new[off : off + SECTOR] != old[off : off + SECTOR]]
        before = {region.file_offset + off: self.pending.get(region.file_offset + off) for off in changed}
        for off in changed:
            self.stage(region.file_offset + off, new[off : off + SECTOR])
        try:
            self.image.metadata = load_metadata(self.io, region)
        except BaseException:
            for offset, sector in before.items():
                if sector is None:
                    self.pending.pop(offset, None)
                    self.overlay.drop_sectors([offset])
                else:
                    self.pending[offset] = sector
                    self.overlay.set_sector(offset, sector)
            raise
