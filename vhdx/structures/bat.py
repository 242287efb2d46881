"""BAT geometry and the BAT as numpy arrays, read in windows of whole chunks.

The BAT interleaves payload-block entries with one sector-bitmap entry after every ``chunk_ratio`` payload
entries. Padding the entry array to whole chunks and reshaping it to ``(chunks, chunk_ratio + 1)`` splits
the two kinds with array indexing alone: column ``chunk_ratio`` holds the bitmap entries.

A 64 TiB disk with 1 MiB blocks has a 512 MiB BAT, mostly empty. ``Bat`` therefore never reads it whole unless
asked to: ranges come from windows of whole chunks (a bounded LRU cache), windows that lie in holes of the file
are not read at all (a hole reads as zeros = NOT_PRESENT), and state counts come from one pass over windows.

References: [MS-VHDX] §2.4 (sector bitmap), §2.5 (BAT), §2.5.1 (entry format).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import cast

from vhdx.errors import FormatError
from vhdx.findings import Code
from vhdx.format import constants as c
from vhdx.io import ImageIO, equal_bytes
from vhdx.lazy import np
from vhdx.structures.region import RegionEntry

BAT_DTYPE = "<u8"  # numpy's name for the entry type (a string: importing this module does not import numpy)
_OFFSET_MASK = ~((1 << c.BAT_OFFSET_SHIFT) - 1) & (2**64 - 1)
# BAT entries per window, rounded down to whole chunks (at least one): 2 MiB of BAT.
WINDOW_ENTRIES = 1 << 18
# The scan judges windows ahead on this many threads (each reads and compares without the GIL), a piece at a
# time: a 1 MiB buffer and the template's matching slice stay in the CPU cache while they are compared.
SCAN_THREADS = 2
SCAN_PIECE = 1 << 20
# A window that repeats one entry except at up to this many places (a qemu-made BAT of ZERO entries with a few
# blocks written) is handed on as that entry and its exceptions: the loader judges those few entries alone.
MAX_EXCEPTIONS = 32
# The scan narrows a differing piece down to cells of this many bytes (64 entries), then compares entry by entry.
_CELL = 512
# Decoded windows kept per file (9 bytes per entry): bounds a reader's BAT memory to about 20 MiB.
WINDOW_CACHE = 8
OFFSET_CLAMP = 1 << 62
_SECTOR = 4096  # a writer stages BAT changes as whole 4 KiB sectors
_RUN_SECTORS = 512  # sectors read at once by point lookups and updates (2 MiB)


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

    @property
    def last_block_bytes(self) -> int:
        """Bytes of virtual disk in the last payload block (less than a block when the size is not a multiple)."""
        return self.virtual_size - (self.data_blocks - 1) * self.block_size

    def payload_block_of(self, index: int) -> int | None:
        """The payload block BAT entry ``index`` describes; None for a sector bitmap entry or one past the disk."""
        stride = self.chunk_ratio + 1
        if index % stride == self.chunk_ratio:
            return None
        block = index - index // stride
        return block if block < self.data_blocks else None

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
    needed = np.where(blocks == geometry.data_blocks - 1, geometry.last_block_bytes, geometry.block_size)
    return np.clip(np.asarray(offsets, dtype=np.int64) + needed - file_size, 0, needed)


def payload_missing_bytes_of(geometry: Geometry, block: int, offset: int, file_size: int) -> int:
    """``payload_missing_bytes`` of one block, in Python (the loader's judgement of a window's few exceptions)."""
    needed = geometry.last_block_bytes if block == geometry.data_blocks - 1 else geometry.block_size
    return min(max(offset + needed - file_size, 0), needed)


def entry_states(entries: np.ndarray) -> np.ndarray:
    """State field (bits 0..2) of each BAT entry."""
    # The state lives in the lowest byte, the first of each little-endian entry: read only those bytes
    # instead of masking (and allocating) a full 64-bit copy of a BAT that may hold 67 million entries.
    low_bytes = np.ascontiguousarray(entries, dtype=BAT_DTYPE).view(np.uint8)[::8]
    return low_bytes & np.uint8(c.BAT_STATE_MASK)


def allocated_mask(states: np.ndarray) -> np.ndarray:
    """Mask of payload states that own file space: FULLY_PRESENT or PARTIALLY_PRESENT."""
    return (states == c.BatState.FULLY_PRESENT) | (states == c.BatState.PARTIALLY_PRESENT)


def entry_offsets(entries: np.ndarray) -> np.ndarray:
    """File offset in bytes of each entry (FileOffsetMB * 1 MiB); reserved bits are masked off.

    FileOffsetMB has 44 bits: offsets past 2**62 would wrap negative in int64, so they are clamped to 2**62,
    far past the end of any file (the one decoder: reader, check, repair, merge and slack agree).
    """
    return np.minimum(entries & np.uint64(_OFFSET_MASK), np.uint64(OFFSET_CLAMP)).astype(np.int64)


def entry_offset(entry: int) -> int:
    """``entry_offsets`` of one entry, in Python."""
    return min(entry & _OFFSET_MASK, OFFSET_CLAMP)


def split_window(entries: np.ndarray, ratio: int, blocks: int, chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """Split raw entries from a chunk boundary into (payload entries, bitmap entries) by reshaping, no loops.

    ``blocks`` payload and ``chunks`` bitmap entries are returned. Whole chunks are viewed as a
    ``(chunks, ratio + 1)`` table and copied once into the outputs; the last, partial chunk is copied as a flat run.
    Entries the array does not hold read as 0 (not present), e.g. the last chunk's bitmap slot, which a
    non-differencing BAT may stop before.
    """
    stride = ratio + 1
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


def split_entries(entries: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Split a whole raw BAT into (payload entries per block, bitmap entries per chunk); see ``split_window``."""
    return split_window(entries, geometry.chunk_ratio, geometry.data_blocks, geometry.sector_bitmap_blocks)



class RawWindow:
    """Raw entries of whole chunks: payload blocks from ``b0`` and sector bitmap chunks from ``k0``.

    ``payload`` and ``bitmap`` are the raw u64 entries of blocks [b0, b0 + blocks) and chunks [k0, k0 + chunks);
    ``entries`` the window's raw entries interleaved as in the file (from chunk k0); ``uniform`` the one entry
    every payload slot holds, when the scan found one. A window the scan recognised as one repeated payload
    entry (``common``) and no sector bitmap, but for at most ``MAX_EXCEPTIONS`` entries (``exceptions``, as
    (index in ``entries``, raw entry)), is made by ``repeating``: its arrays are made only when they are read.
    The open pass judges such a window by its entries alone, so opening an empty or qemu-made 64 TiB disk, even
    with a few blocks written, needs no numpy.
    """

    __slots__ = ("b0", "k0", "blocks", "uniform", "common", "exceptions", "_payload", "_bitmap", "_entries",
                 "_templates", "_chunks", "_n_entries")

    def __init__(self, b0: int, k0: int, payload: np.ndarray, bitmap: np.ndarray, uniform: int | None = None,
                 entries: np.ndarray | None = None) -> None:
        self.b0, self.k0, self.blocks, self.uniform = b0, k0, len(payload), uniform
        self.common: int | None = uniform
        self.exceptions: tuple[tuple[int, int], ...] = ()
        self._payload: np.ndarray | None = payload
        self._bitmap: np.ndarray | None = bitmap
        self._entries = entries
        self._templates: _Templates | None = None
        self._chunks = self._n_entries = 0

    @classmethod
    def repeating(cls, b0: int, k0: int, blocks: int, chunks: int, entry: int, templates: _Templates,
                  n_entries: int, exceptions: tuple[tuple[int, int], ...] = ()) -> RawWindow:
        """A window whose ``blocks`` payload entries hold ``entry`` and ``chunks`` bitmap entries 0 but at exceptions.

        ``exceptions``: (index in the window's entries, raw entry) pairs, at most ``MAX_EXCEPTIONS``.
        """
        window = cls.__new__(cls)
        window.b0, window.k0, window.blocks = b0, k0, blocks
        window.common, window.exceptions = entry, exceptions
        window._payload = window._bitmap = window._entries = None
        window._templates, window._chunks, window._n_entries = templates, chunks, n_entries
        # Exceptions in bitmap slots only: every payload slot still holds ``entry``.
        window.uniform = None if exceptions and window._exception_kinds()[0] else entry
        return window

    @property
    def payload(self) -> np.ndarray:
        if self._payload is None:
            templates = cast(_Templates, self._templates)
            if self.exceptions:
                self._payload, self._bitmap = split_window(cast(np.ndarray, self.entries), templates.stride - 1,
                                                           self.blocks, self._chunks)
            else:
                self._payload = templates.payload(cast(int, self.common), self.blocks)
        return self._payload

    @property
    def bitmap(self) -> np.ndarray:
        if self._bitmap is None:
            if self.exceptions:
                self.payload  # noqa: B018 - splitting the entries makes both arrays
            else:
                self._bitmap = np.zeros(self._chunks, dtype=BAT_DTYPE)
                self._bitmap.flags.writeable = False
        return cast(np.ndarray, self._bitmap)

    @property
    def entries(self) -> np.ndarray | None:
        if self._entries is None and self._templates is not None:
            entries = self._templates.get(cast(int, self.common))[: self._n_entries]
            if self.exceptions:
                entries = entries.copy()
                for i, raw in self.exceptions:
                    entries[i] = raw
                entries.flags.writeable = False
            self._entries = entries
        return self._entries

    def _exception_kinds(self) -> tuple[list[int], list[int]]:
        """The raw values of the exceptions that are (payload entries of the window's blocks, bitmap entries)."""
        stride = cast(_Templates, self._templates).stride
        payload: list[int] = []
        bitmap: list[int] = []
        for i, raw in self.exceptions:
            if i % stride == stride - 1:
                bitmap.append(raw)
            elif i - i // stride < self.blocks:  # a slot of the window's blocks, not padding past the disk
                payload.append(raw)
        return payload, bitmap

    def has_bitmaps(self) -> bool:
        """Whether any sector bitmap entry of the window is not zero."""
        if self._templates is not None:  # a repeating window: only an exception can be one (no numpy asked)
            return any(self._exception_kinds()[1])
        return bool(self.bitmap.any())

    def states(self) -> np.ndarray:
        """Payload states (uint8)."""
        return entry_states(self.payload)

    def present_bitmap_offsets(self) -> np.ndarray:
        """File offsets of the window's present sector bitmap blocks."""
        return entry_offsets(self.bitmap)[entry_states(self.bitmap) == c.SbState.PRESENT]

    def present_bitmaps(self) -> int:
        """How many of the window's sector bitmap entries are PRESENT."""
        if self._templates is not None:  # a repeating window: counted from its exceptions (no numpy asked)
            return sum(raw & c.BAT_STATE_MASK == c.SbState.PRESENT for raw in self._exception_kinds()[1])
        return int(np.count_nonzero(entry_states(self.bitmap) == c.SbState.PRESENT))

    def state_counts(self) -> list[int]:
        """Payload blocks per state value (8 counts); a repeating window is counted without decoding."""
        if self.common is None:
            return cast(list, np.bincount(self.states(), minlength=8).tolist())
        counts = [0] * 8
        payload: list[int] = self._exception_kinds()[0] if self.exceptions else []
        counts[self.common & c.BAT_STATE_MASK] = self.blocks - len(payload)
        for raw in payload:
            counts[raw & c.BAT_STATE_MASK] += 1
        return counts

    def exception_indexes(self) -> list[tuple[int, int]]:
        """(BAT index, raw entry) of each exception."""
        first = self.k0 * cast(_Templates, self._templates).stride if self.exceptions else 0
        return [(first + i, raw) for i, raw in self.exceptions]


class _Templates:
    """The raw entries of a whole-chunk window whose payload entries all hold one entry and bitmap entries 0.

    Built once per entry value and kept for the last few values (a BAT repeats one or two: 0 and ZERO), as bytes
    (``raw``: what the scan compares a window with, no numpy) and as a read-only array (``get``).
    """

    def __init__(self, stride: int, entries: int) -> None:
        self.stride, self._n = stride, entries
        self._lock = threading.Lock()  # the scan's threads ask for templates at once
        self._held: dict[int, bytearray] = {}
        self._payloads: dict[tuple[int, int], np.ndarray] = {}

    def raw(self, entry: int) -> bytearray:
        """The template of ``entry`` as bytes (a bytearray so that ``equal_bytes`` compares it without the GIL)."""
        with self._lock:
            template = self._held.get(entry)
            if template is None:
                if len(self._held) >= 4:
                    self._held.clear()
                chunk = entry.to_bytes(c.BAT_ENTRY_SIZE, "little") * (self.stride - 1) + bytes(c.BAT_ENTRY_SIZE)
                template = bytearray((chunk * ceil_div(self._n, self.stride))[: self._n * c.BAT_ENTRY_SIZE])
                self._held[entry] = template
            return template

    def get(self, entry: int) -> np.ndarray:
        """The template of ``entry`` as entries (read-only)."""
        template = np.frombuffer(self.raw(entry), dtype=BAT_DTYPE)
        template.flags.writeable = False  # yielded as the entries of every window equal to it
        return template

    def payload(self, entry: int, blocks: int) -> np.ndarray:
        """``blocks`` payload entries all ``entry``, as a read-only broadcast of one value (made once per pair)."""
        key = (entry, blocks)
        view = self._payloads.get(key)
        if view is None:
            if len(self._payloads) >= 4:
                self._payloads.clear()
            view = self._payloads[key] = np.broadcast_to(np.array(entry, dtype=BAT_DTYPE), (blocks,))
        return view


@dataclass(frozen=True)
class _Decoded:
    """One window's decoded entries (read-only arrays), as the range accessors cache them.

    A window whose payload entries are all equal (a hole, or a BAT qemu-img filled with ZERO entries) keeps
    that one ``uniform`` entry instead of per-block arrays.
    """

    b0: int
    k0: int
    blocks: int
    uniform: int | None  # the raw payload entry every block of the window has, or None
    states: np.ndarray | None  # None when uniform
    offsets: np.ndarray | None
    bitmap_states: np.ndarray
    bitmap_offsets: np.ndarray

    def payload(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(states, offsets) of the window's blocks [lo, hi) (window-relative)."""
        if self.states is not None and self.offsets is not None:  # not uniform
            return self.states[lo:hi], self.offsets[lo:hi]
        raw = np.array([self.uniform], dtype=BAT_DTYPE)
        return (np.full(hi - lo, entry_states(raw)[0], dtype=np.uint8),
                np.full(hi - lo, entry_offsets(raw)[0], dtype=np.int64))


@dataclass(frozen=True)
class BatSummary:
    """What ``info`` and ``chain`` show of a BAT, gathered in one pass over its windows."""

    state_counts: tuple[int, ...]  # payload blocks per state value 0..7
    bitmaps_present: int  # sector bitmap entries in state PRESENT

    @property
    def allocated_blocks(self) -> int:
        """Payload blocks that own space in the file (fully or partially present)."""
        return self.state_counts[c.BatState.FULLY_PRESENT] + self.state_counts[c.BatState.PARTIALLY_PRESENT]


class StateView:
    """``bat.state_view[b0:b1]``: payload states of a range, for code written against a whole states array."""

    def __init__(self, bat: Bat) -> None:
        self._bat = bat

    def __len__(self) -> int:
        return self._bat.geometry.data_blocks

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise IndexError("BAT state views take contiguous slices only")
        return self._bat.states_of(start, stop)


def _likely_repeated(piece: memoryview, payload_slots: int) -> int:
    """The entry a window repeats, as most of five payload slots spread over its first piece say.

    The first slot alone would do for an empty BAT, but a window whose first blocks are written would then be
    compared with a template of a written block's entry and differ everywhere.
    """
    size = c.BAT_ENTRY_SIZE
    n = min(len(piece) // size, payload_slots)
    samples = [int.from_bytes(piece[i * size : (i + 1) * size], "little")
               for i in sorted({0, n // 4, n // 2, 3 * n // 4, max(n - 1, 0)})]
    return max(samples, key=samples.count)


def _find_exceptions(piece: memoryview, template: memoryview, first: int, found: list) -> bool:
    """Add to ``found`` the entries where ``piece`` differs from ``template`` as (index, raw entry).

    ``first`` is the index of the piece's first entry. Halves that compare equal are skipped whole, so a few
    differences cost a few dozen memcmps; False as soon as more than ``MAX_EXCEPTIONS`` are found.
    """
    if equal_bytes(template, piece):
        return True
    if len(piece) > _CELL:
        half = len(piece) // (2 * c.BAT_ENTRY_SIZE) * c.BAT_ENTRY_SIZE
        return (_find_exceptions(piece[:half], template[:half], first, found)
                and _find_exceptions(piece[half:], template[half:], first + half // c.BAT_ENTRY_SIZE, found))
    for i in range(0, len(piece), c.BAT_ENTRY_SIZE):
        raw = piece[i : i + c.BAT_ENTRY_SIZE]
        if raw != template[i : i + c.BAT_ENTRY_SIZE]:
            found.append((first + i // c.BAT_ENTRY_SIZE, int.from_bytes(raw, "little")))
            if len(found) > MAX_EXCEPTIONS:
                return False
    return True


class Bat:
    """The BAT of one file, read lazily in windows of whole chunks.

    Range accessors (``payload_range``, ``bitmap_range``, ``state_view``), point lookups (``entries_at``,
    ``payload_at``, ``bitmap_at``) and the one-pass ``summary`` work in bounded memory on any disk size; writers
    change entries through the 4 KiB sectors holding them (``set_payload``, ``set_bitmap``). The whole-array
    properties (``entries``, ``states``, ``offsets``, ``bitmap_states``...) read the whole BAT once and keep it
    (small disks, tests, forensic tools); once read whole, every accessor answers from those arrays and updates
    keep them current.
    """

    def __init__(self, io: ImageIO, geometry: Geometry, file_offset: int) -> None:
        self.io = io
        self.geometry = geometry
        self.file_offset = file_offset  # where the BAT region starts in the file
        self._entries: np.ndarray | None = None
        self._cache: OrderedDict[int, _Decoded] = OrderedDict()
        self._lock = threading.Lock()
        self._summary: BatSummary | None = None
        self._uniform: dict[int, int] = {}  # window -> the one payload entry it repeats (no bitmaps), when known
        self.window_chunks = max(1, WINDOW_ENTRIES // (geometry.chunk_ratio + 1))

    @classmethod
    def load(cls, io: ImageIO, region: RegionEntry, geometry: Geometry) -> Bat:
        """The BAT of ``region`` (nothing is read yet); the region and the file must hold every entry."""
        needed = geometry.bat_entries * c.BAT_ENTRY_SIZE
        if region.length < needed:
            raise FormatError(
                f"region length {region.length} cannot hold {geometry.bat_entries} entries ({needed} bytes)",
                structure="BAT",
                offset=region.file_offset,
                path=io.path,
                code=Code.BAT_REGION_SIZE,
            )
        if region.file_offset + needed > io.size:
            raise FormatError(f"{needed} bytes needed but the file ends at {io.size:#x} (truncated?)",
                              structure="BAT", offset=region.file_offset, path=io.path, code=Code.REGION_BEYOND_EOF)
        return cls(io, geometry, region.file_offset)

    # --- windows ------------------------------------------------------------------------------------
    @property
    def window_count(self) -> int:
        return ceil_div(self.geometry.sector_bitmap_blocks, self.window_chunks)

    def _read_entries(self, e0: int, e1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Raw entries [e0, e1) (into ``out`` when given): holes of the file are not read (they are zeros)."""
        if self._entries is not None:
            return self._entries[e0:e1]
        out = np.empty(e1 - e0, dtype=BAT_DTYPE) if out is None else out[: e1 - e0]
        self.io.readinto_data_at(self.file_offset + e0 * c.BAT_ENTRY_SIZE, out.view(np.uint8))
        return out

    def _bounds(self, w: int) -> tuple[int, int, int, int]:
        """(first chunk, chunks, first block, blocks) of window ``w``."""
        g = self.geometry
        k0 = w * self.window_chunks
        k1 = min(g.sector_bitmap_blocks, k0 + self.window_chunks)
        b0 = k0 * g.chunk_ratio
        return k0, k1 - k0, b0, min(g.data_blocks, k1 * g.chunk_ratio) - b0

    def _entry_range(self, w: int) -> tuple[int, int]:
        """Raw entries [e0, e1) of window ``w`` (interleaved payload and bitmap entries, as in the file)."""
        k0, chunks, _, _ = self._bounds(w)
        stride = self.geometry.chunk_ratio + 1
        return k0 * stride, min(self.geometry.bat_entries, (k0 + chunks) * stride)

    def _window(self, w: int, buffer: np.ndarray | None, raw: np.ndarray | None = None) -> RawWindow:
        """Window ``w`` split into payload and bitmap entries (its raw entries are read unless given)."""
        k0, chunks, b0, blocks = self._bounds(w)
        if raw is None:
            raw = self._read_entries(*self._entry_range(w), buffer)
        payload, bitmap = split_window(raw, self.geometry.chunk_ratio, blocks, chunks)
        return RawWindow(b0, k0, payload, bitmap, entries=raw)

    def raw_window(self, w: int) -> RawWindow:
        """Raw entries of window ``w`` (chunks ``w * window_chunks`` onwards), split into payload and bitmap."""
        return self._window(w, None)

    def windows_with_data(self) -> list[int]:
        """Windows that may hold non-zero entries; every other window is all NOT_PRESENT."""
        if self._entries is not None:
            return list(range(self.window_count))
        window_bytes = self.window_chunks * (self.geometry.chunk_ratio + 1) * c.BAT_ENTRY_SIZE
        lo = self.file_offset
        marked: set[int] = set()
        for start, stop in self.io.data_spans(lo, self.geometry.bat_entries * c.BAT_ENTRY_SIZE):
            marked.update(range((start - lo) // window_bytes, (stop - 1 - lo) // window_bytes + 1))
        return sorted(marked)

    def raw_windows(self) -> Iterator[RawWindow]:
        """Every window that holds non-zero entries, in order (one at a time: bounded memory).

        Windows in holes of the file are not read. A window of one repeated payload entry and no sector bitmap
        entry (all zeros, or a BAT qemu-img filled with ZERO entries) is recognised by comparing it with a
        template of that entry (``_judge_window``, on ``SCAN_THREADS`` threads ahead of the caller) and yielded
        without being split or decoded (its ``payload`` is a broadcast view); all-zero windows are skipped. Every
        other window is read into one reused buffer and split.
        """
        stride = self.geometry.chunk_ratio + 1
        n = min(self.window_chunks * stride, self.geometry.bat_entries)
        buffer = None  # for windows that are not uniform, made when the first one comes
        templates = _Templates(stride, n)
        with_data = self.windows_with_data()
        # Judging pays off on many windows (a 512 MiB BAT): one window is read once and split, and a BAT held
        # whole is split from memory. Either way a uniform window is still recognised after the split.
        judge = self._entries is None and len(with_data) > 1
        verdicts = self._judged(with_data, templates) if judge else iter(())
        holding = set(with_data)
        try:
            for w in range(self.window_count):
                verdict = next(verdicts, None) if w in holding else 0
                if verdict == 0:  # a hole of the file, or all zeros: every entry NOT_PRESENT
                    self._uniform[w] = 0
                    continue
                if verdict is not None:
                    uniform, exceptions = verdict if isinstance(verdict, tuple) else (verdict, ())
                    if not exceptions:
                        self._uniform[w] = uniform
                    k0, chunks, b0, blocks = self._bounds(w)
                    e0, e1 = self._entry_range(w)
                    yield RawWindow.repeating(b0, k0, blocks, chunks, uniform, templates, e1 - e0, exceptions)
                    continue
                if buffer is None:
                    buffer = np.empty(n, dtype=BAT_DTYPE)
                window = self._window(w, buffer)
                # Windows of one repeated payload entry are remembered when they carry no bitmap: later range
                # reads of them (map, chain reads) need neither the file nor per-block arrays.
                p = window.payload
                if len(p) and not np.count_nonzero(p != p[0]):
                    repeated = int(p[0])
                    window = RawWindow(window.b0, window.k0, p, window.bitmap, repeated, window.entries)
                    if not np.count_nonzero(window.bitmap):
                        self._uniform[w] = repeated
                        if repeated == 0:
                            continue
                yield window
        finally:
            close = getattr(verdicts, "close", None)
            if close is not None:
                close()  # stops and joins the scan's threads when the caller stops early

    def _judge_window(self, w: int, templates: _Templates, buf: bytearray) -> int | tuple | None:
        """Window ``w`` as the scan sees it: the entry it repeats, that entry and its few exceptions, or None.

        Returns the payload entry every slot of the window holds when its bitmap entries are all 0 (0: all
        zeros); ``(entry, exceptions)`` when that holds but for at most ``MAX_EXCEPTIONS`` entries (index in the
        window, raw entry); None for any other window. The window is read a piece at a time into ``buf`` and
        each piece compared with the same bytes of the template of the entry its first slots hold
        (``equal_bytes``: memcmp without the GIL); a piece that differs is narrowed down to its differing
        entries. The first chunk is read alone first, so a window of real entries is given up after one small
        read.
        """
        e0, e1 = self._entry_range(w)
        lo, length = self.file_offset + e0 * c.BAT_ENTRY_SIZE, (e1 - e0) * c.BAT_ENTRY_SIZE
        view = memoryview(buf)
        whole = len(buf) // c.BAT_ENTRY_SIZE * c.BAT_ENTRY_SIZE  # pieces of whole entries
        pos, piece = 0, min(whole, (self.geometry.chunk_ratio + 1) * c.BAT_ENTRY_SIZE)
        entry, template = 0, None
        exceptions: list[tuple[int, int]] = []
        while pos < length:
            n = min(piece, length - pos)
            self.io.readinto_at(lo + pos, view[:n])
            if template is None:
                entry = _likely_repeated(view[:n], self.geometry.chunk_ratio)
                template = memoryview(templates.raw(entry))
            # (one memcmp when the piece matches: _find_exceptions compares the whole piece first)
            if not _find_exceptions(view[:n], template[pos : pos + n], pos // c.BAT_ENTRY_SIZE, exceptions):
                return None
            pos, piece = pos + n, whole
        return (entry, tuple(exceptions)) if exceptions else entry

    def _judged(self, windows: list[int], templates: _Templates) -> Iterator[int | tuple | None]:
        """``_judge_window`` of each of ``windows``, in order; judged ahead on threads when there are several.

        Reading and comparing run without the GIL, so the threads share the work of a large BAT (a qemu-made
        64 TiB disk has 512 MiB of it); verdicts are small, so the threads run as far ahead as they can.
        """
        threads = min(SCAN_THREADS, len(windows)) if self.io.concurrent_reads else 1
        if threads <= 1:
            buf = bytearray(SCAN_PIECE)
            for w in windows:
                yield self._judge_window(w, templates, buf)
            return
        verdicts: list = [None] * len(windows)
        ready = [threading.Event() for _ in windows]
        claim, stop = itertools.count(), threading.Event()

        def work() -> None:
            buf = bytearray(SCAN_PIECE)
            for i in iter(claim.__next__, None):  # next() of a count is atomic: each window is judged once
                if i >= len(windows) or stop.is_set():
                    return
                try:
                    verdicts[i] = self._judge_window(windows[i], templates, buf)
                except BaseException as exc:  # raised in the caller's thread, at its window
                    verdicts[i] = exc
                ready[i].set()

        workers = [threading.Thread(target=work, name="vhdx-bat-scan", daemon=True) for _ in range(threads)]
        for t in workers:
            t.start()
        try:
            for i in range(len(windows)):
                ready[i].wait()
                verdict = verdicts[i]
                if isinstance(verdict, BaseException):
                    raise verdict
                yield verdict
        finally:
            stop.set()
            for t in workers:
                t.join()

    def _decoded(self, w: int) -> _Decoded:
        with self._lock:  # readers may share an image across threads (serve, mount)
            hit = self._cache.get(w)
            if hit is not None:
                self._cache.move_to_end(w)
                return hit
        k0, chunks, b0, blocks = self._bounds(w)
        stride = self.geometry.chunk_ratio + 1
        lo = self.file_offset + k0 * stride * c.BAT_ENTRY_SIZE
        uniform = self._uniform.get(w)
        if uniform is None and self._entries is None and not self.io.data_spans(lo, chunks * stride * c.BAT_ENTRY_SIZE):
            uniform = 0  # a hole of the file: every entry NOT_PRESENT
        if uniform is not None and self._entries is None:
            empty = np.zeros(chunks, dtype=np.int64)
            decoded = _Decoded(b0, k0, blocks, uniform, None, None, empty.astype(np.uint8), empty)
        else:
            win = self.raw_window(w)
            p = win.payload
            uniform = int(p[0]) if len(p) and not np.count_nonzero(p != p[0]) else None
            arrays: list[np.ndarray | None] = [None, None] if uniform is not None else [entry_states(p),
                                                                                         entry_offsets(p)]
            arrays += [entry_states(win.bitmap), entry_offsets(win.bitmap)]
            for a in arrays:
                if a is not None:
                    a.flags.writeable = False
            decoded = _Decoded(b0, k0, blocks, uniform, arrays[0], arrays[1], cast(np.ndarray, arrays[2]),
                               cast(np.ndarray, arrays[3]))
        with self._lock:
            self._cache[w] = decoded
            while len(self._cache) > WINDOW_CACHE:
                self._cache.popitem(last=False)
        return decoded

    def _payload_windows(self, b0: int, b1: int):
        """(decoded window, lo, hi) of the windows that cover payload blocks [b0, b1) (b1 clipped)."""
        per = self.window_chunks * self.geometry.chunk_ratio
        b1 = min(b1, self.geometry.data_blocks)
        for w in range(b0 // per, (b1 - 1) // per + 1) if b1 > b0 else ():
            d = self._decoded(w)
            yield d, max(b0, d.b0) - d.b0, min(b1, d.b0 + d.blocks) - d.b0

    # --- ranges (bounded memory) --------------------------------------------------------------------
    def payload_range(self, b0: int, b1: int) -> tuple[np.ndarray, np.ndarray]:
        """(states uint8, file offsets int64 bytes) of payload blocks [b0, b1); treat them as read-only."""
        if self._entries is not None:
            return self.states[b0:b1], self.offsets[b0:b1]
        parts = [d.payload(lo, hi) for d, lo, hi in self._payload_windows(b0, b1)]
        if not parts:
            return np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.int64)
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def states_of(self, b0: int, b1: int) -> np.ndarray:
        """States (uint8) of payload blocks [b0, b1), without their offsets (1 byte per block)."""
        if self._entries is not None:
            return self.states[b0:b1]
        parts = [d.payload(lo, hi)[0] if d.uniform is None else
                 np.full(hi - lo, d.uniform & c.BAT_STATE_MASK, dtype=np.uint8)
                 for d, lo, hi in self._payload_windows(b0, b1)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)

    def uniform_state(self, b0: int, b1: int) -> int | None:
        """The state of every payload block in [b0, b1) when all of them have the same raw entry, else None.

        Answered from the window cache without per-block arrays: a 64 TiB disk is mostly such runs.
        """
        if self._entries is not None or b1 <= b0:
            return None
        entries = {d.uniform for d, _lo, _hi in self._payload_windows(b0, b1)}
        if len(entries) != 1 or None in entries:
            return None
        return entries.pop() & c.BAT_STATE_MASK

    def bitmap_range(self, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray]:
        """(states uint8, file offsets int64 bytes) of sector bitmap entries of chunks [k0, k1); read-only."""
        if self._entries is not None:
            return self.bitmap_states[k0:k1], self.bitmap_offsets[k0:k1]
        per = self.window_chunks
        k1 = min(k1, self.geometry.sector_bitmap_blocks)
        if k1 <= k0:
            return np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.int64)
        parts = []
        for w in range(k0 // per, (k1 - 1) // per + 1):
            d = self._decoded(w)
            lo, hi = max(k0, d.k0) - d.k0, min(k1, d.k0 + len(d.bitmap_states)) - d.k0
            parts.append((d.bitmap_states[lo:hi], d.bitmap_offsets[lo:hi]))
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @property
    def state_view(self) -> StateView:
        """Payload states sliceable like an array (``[b0:b1]``), read window by window."""
        return StateView(self)

    # --- counts (one pass) --------------------------------------------------------------------------
    @property
    def summary(self) -> BatSummary:
        """State counts and present bitmaps, from one pass over the windows that hold data (kept)."""
        if self._summary is None:
            counts, bitmaps = [0] * 8, 0
            for win in self.raw_windows():
                counts = [a + b for a, b in zip(counts, win.state_counts(), strict=True)]
                bitmaps += win.present_bitmaps()
            self.set_summary(counts, bitmaps)
        return cast(BatSummary, self._summary)

    def set_summary(self, counts: Sequence[int], bitmaps_present: int) -> None:
        """Record counts of the windows with data; blocks in skipped windows count as NOT_PRESENT."""
        counts = [int(n) for n in counts]
        counts[c.BatState.NOT_PRESENT] += self.geometry.data_blocks - sum(counts)
        self._summary = BatSummary(tuple(int(n) for n in counts), int(bitmaps_present))

    def state_counts(self) -> dict[str, int]:
        """How many payload blocks are in each state, by spec name (zero counts left out)."""
        names = {s.value: s.name for s in c.BatState}
        return {names.get(v, f"RESERVED_{v}"): n for v, n in enumerate(self.summary.state_counts) if n}

    def entry_file_offset(self, bat_index: int) -> int:
        """File offset of one BAT entry (for error messages and findings)."""
        return self.file_offset + bat_index * c.BAT_ENTRY_SIZE

    # --- the whole BAT (small disks only; never on the write path) ------------------------------------
    @property
    def entries(self) -> np.ndarray:
        """Every raw entry (length geometry.bat_entries), read once and kept: small disks only."""
        if self._entries is None:
            self._entries = self._read_entries(0, self.geometry.bat_entries)
            self._cache.clear()
        return self._entries

    @cached_property
    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        return split_entries(self.entries, self.geometry)

    def invalidate(self) -> None:
        """Forget decoded arrays and counts after ``entries`` changed."""
        for name in ("_split", "states", "offsets", "bitmap_states", "bitmap_offsets"):
            self.__dict__.pop(name, None)
        self._cache.clear()
        self._summary = None
        self._uniform.clear()

    @property
    def payload_entries(self) -> np.ndarray:
        return self._split[0]

    @property
    def bitmap_entries(self) -> np.ndarray:
        return self._split[1]

    @cached_property
    def states(self) -> np.ndarray:
        """BatState of every payload block (uint8); the whole BAT (small disks only)."""
        return entry_states(self.payload_entries)

    @cached_property
    def offsets(self) -> np.ndarray:
        """File offset of every payload block (int64 bytes; meaningful only for present blocks); whole BAT."""
        return entry_offsets(self.payload_entries)

    @cached_property
    def bitmap_states(self) -> np.ndarray:
        return entry_states(self.bitmap_entries)

    @cached_property
    def bitmap_offsets(self) -> np.ndarray:
        return entry_offsets(self.bitmap_entries)

    def allocated_blocks(self) -> np.ndarray:
        """Mask of payload blocks that own space in the file (fully or partially present); whole BAT."""
        return allocated_mask(self.states)

    # --- point lookups, held space and updates (writers; bounded memory) ----------------------------
    def entries_at(self, index) -> np.ndarray:
        """Raw entries at BAT indexes ``index`` (any order), read through the overlay (a writer's staged sectors).

        Only the 4 KiB sectors holding them are read: a point lookup costs one read, not a window decode.
        """
        index = np.atleast_1d(np.asarray(index, dtype=np.int64))
        if self._entries is not None:
            return self._entries[index].copy()
        out = np.zeros(len(index), dtype=BAT_DTYPE)
        for _lo, buf, sel, rel in self._sector_runs(index):
            out[sel] = buf[rel]
        return out

    def payload_at(self, block: int) -> tuple[int, int]:
        """(state, file offset) of one payload block."""
        entry = self.entries_at(self.geometry.payload_index(block))
        return int(entry_states(entry)[0]), int(entry_offsets(entry)[0])

    def bitmap_at(self, chunk: int) -> tuple[int, int]:
        """(state, file offset) of one sector bitmap entry."""
        entry = self.entries_at(self.geometry.bitmap_index(chunk))
        return int(entry_states(entry)[0]), int(entry_offsets(entry)[0])

    def _sector_runs(self, index: np.ndarray):
        """(first entry, entries of a run of 4 KiB BAT sectors, positions in ``index``, their offsets in the run).

        The sectors holding ``index`` are read in runs of consecutive sectors (at most 2 MiB each); the arrays
        yielded are fresh copies a caller may change.
        """
        per = _SECTOR // c.BAT_ENTRY_SIZE
        order = np.argsort(index, kind="stable")
        sorted_index = index[order]
        sectors = np.unique(sorted_index // per)
        cut = np.flatnonzero(np.diff(sectors) != 1) + 1
        for run in np.split(sectors, cut):
            for start in range(0, len(run), _RUN_SECTORS):
                s0, s1 = int(run[start]), int(run[min(start + _RUN_SECTORS, len(run)) - 1]) + 1
                lo, hi = s0 * per, s1 * per
                a, b = np.searchsorted(sorted_index, [lo, hi])
                raw = bytearray(self.io.read_at(self.entry_file_offset(lo), (hi - lo) * c.BAT_ENTRY_SIZE))
                yield lo, np.frombuffer(raw, dtype=BAT_DTYPE), order[a:b], sorted_index[a:b] - lo

    def update_entries(self, index, values, stage) -> np.ndarray:
        """Set raw entries ``index`` to ``values`` and return the entries they replace.

        The 4 KiB BAT sectors holding them are read (through the overlay), changed and handed to
        ``stage(file_offset, sector_bytes)`` (the writer's pending metadata, which reads see at once); the
        decoded windows they lie in are dropped. No whole-BAT array is made; one already read is kept current.
        A repeated index takes its last value.
        """
        index = np.atleast_1d(np.asarray(index, dtype=np.int64))
        values = np.broadcast_to(np.asarray(values, dtype=BAT_DTYPE), index.shape)
        old = np.zeros(len(index), dtype=BAT_DTYPE)
        per = _SECTOR // c.BAT_ENTRY_SIZE
        for lo, buf, sel, rel in self._sector_runs(index):
            old[sel] = buf[rel]
            buf[rel] = values[sel]
            for s in np.unique(rel // per).tolist():
                stage(self.entry_file_offset(lo + s * per), buf[s * per : (s + 1) * per].tobytes())
        if self._entries is not None:
            self._entries[index] = values  # the split arrays are kept current by set_payload/set_bitmap
        windows = np.unique(index // (self.geometry.chunk_ratio + 1) // self.window_chunks).tolist()
        with self._lock:
            for w in windows:
                self._cache.pop(w, None)
                self._uniform.pop(w, None)
        self._summary = None
        return old

    def set_payload(self, blocks, state: int, offsets, stage) -> np.ndarray:
        """Set payload entries of ``blocks`` to (state, offsets) through ``stage``; returns the old raw entries."""
        blocks = np.atleast_1d(np.asarray(blocks, dtype=np.int64))
        offsets = np.broadcast_to(np.asarray(offsets, dtype=np.int64), blocks.shape)
        values = (offsets.astype(np.uint64) & np.uint64(_OFFSET_MASK)) | np.uint64(state)
        old = self.update_entries(self.geometry.payload_index(blocks), values, stage)
        if "_split" in self.__dict__:  # a whole BAT read before: keep its arrays current
            self.payload_entries[blocks] = values
        if "states" in self.__dict__:
            self.states[blocks] = state
        if "offsets" in self.__dict__:
            self.offsets[blocks] = offsets
        return old

    def set_bitmap(self, chunks, state: int, offset: int, stage) -> np.ndarray:
        """Set sector bitmap entries of ``chunks`` through ``stage``; returns the old raw entries."""
        chunks = np.atleast_1d(np.asarray(chunks, dtype=np.int64))
        value = (np.uint64(offset) & np.uint64(_OFFSET_MASK)) | np.uint64(state)
        old = self.update_entries(self.geometry.bitmap_index(chunks), value, stage)
        if "_split" in self.__dict__:
            self.bitmap_entries[chunks] = value
        if "bitmap_states" in self.__dict__:
            self.bitmap_states[chunks] = state
        if "bitmap_offsets" in self.__dict__:
            self.bitmap_offsets[chunks] = offset
        return old

    def held_end(self) -> int:
        """End of the last file space the BAT holds (0 if none), in one pass over the windows with data.

        Held: blocks that own space (fully or partially present), ZERO/UNMAPPED/UNDEFINED blocks that kept
        their offset (their space is reused by their next write), and present sector bitmaps.
        """
        end = 0
        for win in self.raw_windows():
            states, offsets = entry_states(win.payload), entry_offsets(win.payload)
            held = held_blocks(states, offsets)
            if held.any():
                end = max(end, int(offsets[held].max()) + self.geometry.block_size)
            sb_offsets = win.present_bitmap_offsets()
            if len(sb_offsets):
                end = max(end, int(sb_offsets.max()) + c.SECTOR_BITMAP_BLOCK_SIZE)
        return end

    def taken_units(self, size: int) -> np.ndarray:
        """Which 1 MiB units of the file's first ``size`` bytes allocated blocks and present bitmaps take (bool).

        One pass over the windows with data; 1 byte per MiB of file (64 MiB for a 64 TiB file).
        """
        taken = np.zeros(ceil_div(size, c.ALIGNMENT), dtype=bool)
        for win in self.raw_windows():
            mark_units(taken, entry_offsets(win.payload)[allocated_mask(win.states())], self.geometry.block_size)
            mark_units(taken, win.present_bitmap_offsets(), c.SECTOR_BITMAP_BLOCK_SIZE)
        return taken


def held_blocks(states: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Mask of payload blocks that hold file space: allocated, or reading as zeros but keeping their offset."""
    return allocated_mask(states) | kept_space_mask(states, offsets)


def kept_space_mask(states: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Mask of blocks that read as zeros (ZERO/UNMAPPED/UNDEFINED) but kept the file space of their present days."""
    return np.isin(states, c.ZERO_READING_STATES) & (offsets > 0)


def mark_units(taken: np.ndarray, offsets: np.ndarray, length: int) -> None:
    """Mark the 1 MiB units of extents [offset, offset + length) in ``taken``; what lies past its end is ignored."""
    units = np.asarray(offsets, dtype=np.int64) // c.ALIGNMENT
    units = units[units < len(taken)]
    for k in range(ceil_div(length, c.ALIGNMENT)):
        u = units + k
        taken[u[u < len(taken)]] = True
