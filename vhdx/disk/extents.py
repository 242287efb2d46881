"""Extent lists of a virtual disk as numpy arrays, and the pure functions that build and combine them.

An extent list partitions a virtual byte range into runs, each saying where its bytes come from: a file
offset in one layer of the chain (DATA), zeros decided by a layer (ZERO), or nothing in this layer (ABSENT:
the parent supplies it, or zeros at the base of a chain).

References: [MS-VHDX] §2.4 (sector bitmap, LSB-first), §2.5.1.1 (payload block states and how they read).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum

from vhdx.format import constants as c
from vhdx.lazy import np


class ExtentKind(IntEnum):
    ABSENT = 0
    ZERO = 1
    DATA = 2


@functools.cache
def _kind_of_state() -> np.ndarray:
    """How each payload block state reads in a single layer (PARTIALLY_PRESENT is resolved from the bitmap)."""
    kinds = np.full(8, 255, dtype=np.uint8)
    kinds[c.BatState.NOT_PRESENT] = ExtentKind.ABSENT
    kinds[list(c.ZERO_READING_STATES)] = ExtentKind.ZERO
    kinds[c.BatState.FULLY_PRESENT] = ExtentKind.DATA
    kinds.flags.writeable = False
    return kinds


@dataclass(frozen=True)
class Extents:
    """Parallel arrays, sorted by ``start``, covering a contiguous virtual range without gaps."""

    start: np.ndarray  # int64 virtual byte offset
    length: np.ndarray  # int64 bytes
    kind: np.ndarray  # uint8 ExtentKind
    layer: np.ndarray  # int16 chain depth that supplies the bytes (0 = the opened file), -1 for none
    file_offset: np.ndarray  # int64 file offset of the first byte for DATA, -1 otherwise

    def __len__(self) -> int:
        return len(self.start)

    @property
    def end(self) -> np.ndarray:
        return self.start + self.length

    @classmethod
    def empty(cls) -> Extents:
        e = np.zeros(0, dtype=np.int64)
        return cls(e, e, e.astype(np.uint8), e.astype(np.int16), e)

    def rows(self):
        """Iterate as Python tuples (start, length, kind, layer, file_offset): for output, not hot paths."""
        return zip(self.start.tolist(), self.length.tolist(), self.kind.tolist(), self.layer.tolist(),
                   self.file_offset.tolist(), strict=True)

    def with_layer(self, layer: int) -> Extents:
        layers = np.where(self.kind == ExtentKind.ABSENT, -1, layer).astype(np.int16)
        return Extents(self.start, self.length, self.kind, layers, self.file_offset)


def kinds_of_states(states: np.ndarray) -> np.ndarray:
    """ExtentKind per payload block state; 255 marks PARTIALLY_PRESENT and reserved states."""
    return _kind_of_state()[states]


def coalesce(ext: Extents) -> Extents:
    """Merge neighbours with the same kind and layer whose file offsets continue (DATA) (vectorised)."""
    if len(ext) <= 1:
        return ext
    prev_end_file = ext.file_offset[:-1] + ext.length[:-1]
    same = (ext.kind[1:] == ext.kind[:-1]) & (ext.layer[1:] == ext.layer[:-1])
    same &= (ext.kind[1:] != ExtentKind.DATA) | (ext.file_offset[1:] == prev_end_file)
    first = np.concatenate(([True], ~same))
    idx = np.flatnonzero(first)
    return Extents(ext.start[idx], np.add.reduceat(ext.length, idx), ext.kind[idx], ext.layer[idx],
                   ext.file_offset[idx])


def clip(ext: Extents, start: int, end: int) -> Extents:
    """Restrict to [start, end), trimming the first and last extents."""
    if len(ext) == 0:
        return ext
    s = np.maximum(ext.start, start)
    e = np.minimum(ext.start + ext.length, end)
    keep = e > s
    shift = s - ext.start
    fo = np.where(ext.kind == ExtentKind.DATA, ext.file_offset + shift, -1)
    return Extents(s[keep], (e - s)[keep], ext.kind[keep], ext.layer[keep], fo[keep])


def overlay_stack(stack: list[Extents]) -> Extents:
    """The chain's view of ``stack[0]``'s range: each run from the first layer of the stack that is not ABSENT there.

    ``stack`` lists one extent list per layer, top first, each covering a range inside the one before it; the
    result's ``layer`` is the index into the stack. What overlaying the layers pairwise from the bottom up would
    give, in one pass over the elementary pieces of all layers instead of one pass per layer over a growing list.
    """
    top = stack[0]
    if len(stack) == 1 or len(top) == 0:
        return top.with_layer(0)
    lo, hi = int(top.start[0]), int(top.start[-1] + top.length[-1])
    cuts = np.unique(np.concatenate([p.start for p in stack] + [p.end for p in stack]))
    bounds = cuts[(cuts >= lo) & (cuts < hi)]
    n = len(bounds)
    kind = np.full(n, ExtentKind.ABSENT, dtype=np.uint8)
    layer = np.full(n, -1, dtype=np.int16)
    fo = np.full(n, -1, dtype=np.int64)
    open_ = np.ones(n, dtype=bool)
    left = n
    for depth, ext in enumerate(stack):
        held = np.flatnonzero(ext.kind != ExtentKind.ABSENT)
        if not len(held):
            continue
        # Every boundary of every layer is a cut, so a run covers whole pieces: from the one it starts at to the one
        # it ends before. Which pieces are covered comes from a difference array over the runs, not the pieces.
        first = np.searchsorted(bounds, ext.start[held])
        last = np.searchsorted(bounds, ext.end[held])
        covered = np.cumsum(np.bincount(first, minlength=n + 1) - np.bincount(last, minlength=n + 1))[:n] > 0
        pos = np.flatnonzero(covered & open_)
        if not len(pos):
            continue
        run = np.searchsorted(ext.start, bounds[pos], side="right") - 1
        kind[pos] = ext.kind[run]
        layer[pos] = depth
        fo[pos] = np.where(ext.kind[run] == ExtentKind.DATA, ext.file_offset[run] + bounds[pos] - ext.start[run], -1)
        open_[pos] = False
        left -= len(pos)
        if not left:
            break
    lengths = np.diff(np.append(bounds, hi))
    return coalesce(Extents(bounds.astype(np.int64), lengths.astype(np.int64), kind, layer, fo))


def bitmap_runs(bits: np.ndarray, block_start: np.ndarray, block_file_offset: np.ndarray, sector_size: int
                ) -> Extents:
    """Runs of equal bits in per-block sector bitmaps, as DATA (bit 1) / ABSENT (bit 0) extents.

    Args:
        bits: (blocks, sectors_per_block) array of 0/1, already unpacked LSB-first.
        block_start: virtual byte offset of each block.
        block_file_offset: file offset of each block's payload.
        sector_size: logical sector size in bytes.
    """
    rows, spb = bits.shape
    flat = bits.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.union1d(change, np.arange(rows, dtype=np.int64) * spb)
    ends = np.append(starts[1:], rows * spb)
    row = starts // spb
    col = starts % spb
    value = flat[starts].astype(bool)
    vstart = block_start[row] + col * sector_size
    length = (ends - starts) * sector_size
    kind = np.where(value, ExtentKind.DATA, ExtentKind.ABSENT).astype(np.uint8)
    fo = np.where(value, block_file_offset[row] + col * sector_size, -1)
    return Extents(vstart.astype(np.int64), length.astype(np.int64), kind, np.full(len(starts), -1, np.int16),
                   fo.astype(np.int64))


def concat_sorted(parts: list[Extents]) -> Extents:
    """Concatenate extent lists and sort by start."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Extents.empty()
    start = np.concatenate([p.start for p in parts])
    order = np.argsort(start, kind="stable")
    return Extents(start[order], np.concatenate([p.length for p in parts])[order],
                   np.concatenate([p.kind for p in parts])[order], np.concatenate([p.layer for p in parts])[order],
                   np.concatenate([p.file_offset for p in parts])[order])
