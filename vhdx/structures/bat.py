"""BAT geometry and the whole BAT as numpy arrays.

The BAT interleaves payload-block entries with one sector-bitmap entry after every ``chunk_ratio`` payload
entries. Padding the entry array to whole chunks and reshaping it to ``(chunks, chunk_ratio + 1)`` splits
the two kinds with array indexing alone: column ``chunk_ratio`` holds the bitmap entries.

References: [MS-VHDX] §2.4 (sector bitmap), §2.5 (BAT), §2.5.1 (entry format).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from vhdx.errors import FormatError
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.structures.region import RegionEntry

BAT_DTYPE = np.dtype("<u8")
_OFFSET_MASK = np.uint64(~((1 << c.BAT_OFFSET_SHIFT) - 1) & (2**64 - 1))
_STATE_MASK = np.uint64(c.BAT_STATE_MASK)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Geometry:
    """Sizes that follow from (virtual size, block size, logical sector size, has parent)."""

    virtual_size: int
    block_size: int
    logical_sector_size: int
    has_parent: bool

    @property
    def chunk_ratio(self) -> int:
        """Payload blocks described by one sector bitmap block."""
        return (c.SECTORS_PER_CHUNK * self.logical_sector_size) // self.block_size

    @property
    def chunk_size(self) -> int:
        """Bytes of virtual disk covered by one sector bitmap block."""
        return c.SECTORS_PER_CHUNK * self.logical_sector_size

    @property
    def data_blocks(self) -> int:
        return ceil_div(self.virtual_size, self.block_size)

    @property
    def sector_bitmap_blocks(self) -> int:
        return ceil_div(self.data_blocks, self.chunk_ratio)

    @property
    def bat_entries(self) -> int:
        """Entries the BAT must hold: up to the last payload entry, or the last bitmap entry if differencing."""
        if self.has_parent:
            return self.sector_bitmap_blocks * (self.chunk_ratio + 1)
        if self.data_blocks == 0:
            return 0
        return self.data_blocks + (self.data_blocks - 1) // self.chunk_ratio

    @property
    def sectors_per_block(self) -> int:
        return self.block_size // self.logical_sector_size

    @property
    def bitmap_bytes_per_block(self) -> int:
        """Bytes of a sector bitmap block that describe one payload block."""
        return self.sectors_per_block // 8

    def payload_index(self, block):
        """BAT index of payload block(s) ``block`` (int or array)."""
        return block + block // self.chunk_ratio

    def bitmap_index(self, chunk):
        """BAT index of the sector bitmap entry of chunk(s) ``chunk``."""
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio


def payload_missing_bytes(geometry: Geometry, blocks: np.ndarray, offsets: np.ndarray, file_size: int) -> np.ndarray:
    """Bytes of each payload block's virtual disk data that lie past the end of the file (0: all there).

    The one rule for truncated payload, used by the reader and by check (QEMU's rule): only what lies beyond the
    virtual disk's end may be missing, i.e. the tail of the last block of a disk whose size is not a multiple of
    the block size. Anything else is data the file should hold and does not (``BAT_BEYOND_EOF``).
    """
    blocks = np.asarray(blocks, dtype=np.int64)
    last = geometry.data_blocks - 1
    needed = np.where(blocks == last, geometry.virtual_size - last * geometry.block_size, geometry.block_size)
    return np.clip(np.asarray(offsets, dtype=np.int64) + needed - file_size, 0, needed)


def entry_states(entries: np.ndarray) -> np.ndarray:
    """State field (bits 0..2) of each BAT entry."""
    # The state lives in the lowest byte, the first of each little-endian entry: read only those bytes
    # instead of masking (and allocating) a full 64-bit copy of a BAT that may hold 67 million entries.
    low_bytes = np.ascontiguousarray(entries, dtype=BAT_DTYPE).view(np.uint8)[::8]
    return low_bytes & np.uint8(c.BAT_STATE_MASK)


def entry_offsets(entries: np.ndarray) -> np.ndarray:
    """File offset in bytes of each entry (FileOffsetMB * 1 MiB); reserved bits are masked off."""
    return (entries & _OFFSET_MASK).astype(np.int64)


def split_entries(entries: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Split a raw BAT into (payload entries per block, bitmap entries per chunk) by reshaping, no loops.

    Whole chunks are viewed as a ``(chunks, chunk_ratio + 1)`` table and copied once into the outputs; the
    last, partial chunk is copied as a flat run. Entries the array does not hold read as 0 (not present),
    e.g. the last chunk's bitmap slot, which a non-differencing BAT may stop before.
    """
    ratio = geometry.chunk_ratio
    stride = ratio + 1
    blocks = geometry.data_blocks
    chunks = geometry.sector_bitmap_blocks
    entries = entries[: chunks * stride]
    rows = min(len(entries) // stride, blocks // ratio)
    table = entries[: rows * stride].reshape(rows, stride)
    payload = np.zeros(blocks, dtype=BAT_DTYPE)
    payload[: rows * ratio].reshape(rows, ratio)[...] = table[:, :ratio]
    rest = entries[rows * stride : rows * stride + min(blocks - rows * ratio, ratio)]
    payload[rows * ratio : rows * ratio + len(rest)] = rest
    bitmap = np.zeros(chunks, dtype=BAT_DTYPE)
    bitmap[:rows] = table[:, ratio]
    # A last chunk that holds fewer than chunk_ratio blocks may still carry its bitmap entry (differencing).
    last = rows * stride + ratio
    if rows < chunks and last < len(entries):
        bitmap[rows] = entries[last]
    return payload, bitmap


@dataclass
class Bat:
    """The BAT of one file: raw entries plus decoded per-block and per-chunk arrays."""

    entries: np.ndarray  # raw little-endian u64 entries, length geometry.bat_entries
    geometry: Geometry
    file_offset: int  # where the BAT region starts in the file

    @classmethod
    def load(cls, io: ImageIO, region: RegionEntry, geometry: Geometry) -> Bat:
        """Read the BAT with one read into a numpy array; the region must hold every entry."""
        needed = geometry.bat_entries * c.BAT_ENTRY_SIZE
        if region.length < needed:
            raise FormatError(
                f"region length {region.length} cannot hold {geometry.bat_entries} entries ({needed} bytes)",
                structure="BAT",
                offset=region.file_offset,
                path=io.path,
            )
        if region.file_offset + needed > io.size:
            raise FormatError(f"{needed} bytes needed but the file ends at {io.size:#x} (truncated?)",
                              structure="BAT", offset=region.file_offset, path=io.path)
        entries = np.zeros(geometry.bat_entries, dtype=BAT_DTYPE)
        io.readinto_at(region.file_offset, entries)
        return cls(entries, geometry, region.file_offset)

    @cached_property
    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        return split_entries(self.entries, self.geometry)

    def invalidate(self) -> None:
        """Forget decoded arrays after ``entries`` changed."""
        for name in ("_split", "states", "offsets", "bitmap_states", "bitmap_offsets"):
            self.__dict__.pop(name, None)

    @property
    def payload_entries(self) -> np.ndarray:
        return self._split[0]

    @property
    def bitmap_entries(self) -> np.ndarray:
        return self._split[1]

    @cached_property
    def states(self) -> np.ndarray:
        """BatState of every payload block (uint8)."""
        return entry_states(self.payload_entries)

    @cached_property
    def offsets(self) -> np.ndarray:
        """File offset of every payload block (int64 bytes; meaningful only for present blocks)."""
        return entry_offsets(self.payload_entries)

    def payload_range(self, b0: int, b1: int) -> tuple[np.ndarray, np.ndarray]:
        """(states, offsets) of payload blocks [b0, b1): the one accessor readers use for a range of the BAT."""
        return self.states[b0:b1], self.offsets[b0:b1]

    @cached_property
    def bitmap_states(self) -> np.ndarray:
        return entry_states(self.bitmap_entries)

    @cached_property
    def bitmap_offsets(self) -> np.ndarray:
        return entry_offsets(self.bitmap_entries)

    def entry_file_offset(self, bat_index: int) -> int:
        """File offset of one BAT entry (for error messages and findings)."""
        return self.file_offset + bat_index * c.BAT_ENTRY_SIZE

    def state_counts(self) -> dict[str, int]:
        """How many payload blocks are in each state, by spec name (zero counts left out)."""
        # Eight vectorised passes over uint8 states; bincount would first widen them to 64-bit integers.
        counts = [np.count_nonzero(self.states == v) for v in range(8)]
        names = {s.value: s.name for s in c.BatState}
        return {names.get(v, f"RESERVED_{v}"): int(n) for v, n in enumerate(counts) if n}

    def allocated_blocks(self) -> np.ndarray:
        """Mask of payload blocks that own space in the file (fully or partially present)."""
        return (self.states == c.BatState.FULLY_PRESENT) | (self.states == c.BatState.PARTIALLY_PRESENT)

    # --- in-place updates (writer) ------------------------------------------------------------------
    def set_payload(self, blocks: np.ndarray, state: int, offsets) -> np.ndarray:
        """Set payload entries of ``blocks`` to (state, offsets); returns their BAT indexes."""
        offsets = np.broadcast_to(np.asarray(offsets, dtype=np.int64), blocks.shape)
        values = (offsets.astype(np.uint64) & _OFFSET_MASK) | np.uint64(state)
        index = self.geometry.payload_index(blocks)
        self.entries[index] = values
        self.payload_entries[blocks] = values
        if "states" in self.__dict__:
            self.states[blocks] = state
        if "offsets" in self.__dict__:
            self.offsets[blocks] = offsets
        return index

    def set_bitmap(self, chunks: np.ndarray, state: int, offset: int) -> np.ndarray:
        """Set sector bitmap entries of ``chunks``; returns their BAT indexes."""
        value = (np.uint64(offset) & _OFFSET_MASK) | np.uint64(state)
        index = self.geometry.bitmap_index(chunks)
        self.entries[index] = value
        self.bitmap_entries[chunks] = value
        if "bitmap_states" in self.__dict__:
            self.bitmap_states[chunks] = state
        if "bitmap_offsets" in self.__dict__:
            self.bitmap_offsets[chunks] = offset
        return index
