"""Who supplies each byte of a virtual disk: a cached, windowed map of the whole chain for fast reads.

Resolving a read by overlaying the extents of every layer costs a dozen numpy calls per layer and request.
Instead each read-only image keeps the resolved map (``layer`` and ``file_offset`` per run, as the extent
overlay of the whole chain gives it) for windows of blocks, built once on first use and kept in a small LRU
bounded by the number of runs held. A request is then a binary search and one ``preadv`` per contiguous file
run; neighbouring data runs are gathered into spans so that a copy writes once per span.

References: [MS-VHDX] §2.4 (sector bitmaps), §2.5.1.1 (how payload block states read).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from vhdx.disk.extents import ExtentKind, Extents

# Virtual bytes per window: a few numpy passes per layer build one, a 4 KiB read through a cached one is a lookup.
WINDOW_BYTES = 256 << 20
# Runs kept over all cached windows of one image (about 27 bytes each): bounds memory on any disk and chain.
MAX_CACHED_RUNS = 1 << 21
# A window is built once this many requests have met it uncached: random reads scattered over a 64 TiB disk
# never pay for building windows they touch once (the caller answers those by walking the BAT).
BUILD_AFTER = 3
_MAX_MISS_COUNTERS = 1 << 12


@dataclass(frozen=True)
class SupplyWindow:
    """The resolved runs of one window, sorted by start and covering it without gaps."""

    start: np.ndarray  # int64 virtual offset
    end: np.ndarray  # int64
    kind: np.ndarray  # uint8 ExtentKind
    layer: np.ndarray  # int16 depth that supplies DATA (0 = the opened file)
    file_offset: np.ndarray  # int64 file offset of the first byte (DATA only)

    @classmethod
    def from_extents(cls, ext: Extents) -> SupplyWindow:
        return cls(ext.start, ext.end, ext.kind, ext.layer, ext.file_offset)

    def __len__(self) -> int:
        return len(self.start)

    def rows(self, start: int, end: int) -> list[tuple[int, int, int, int, int]]:
        """Runs of [start, end) (inside this window), clipped, as in ``SupplyIndex.runs``."""
        i = int(self.start.searchsorted(start, "right")) - 1
        if end <= int(self.end[i]):  # the usual small request: inside one run
            kind = int(self.kind[i])
            fo = int(self.file_offset[i]) + start - int(self.start[i]) if kind == ExtentKind.DATA else -1
            return [(start, end - start, kind, int(self.layer[i]), fo)]
        j = int(self.start.searchsorted(end, "left"))
        out = []
        for s, e, kind, layer, fo in zip(self.start[i:j].tolist(), self.end[i:j].tolist(), self.kind[i:j].tolist(),
                                         self.layer[i:j].tolist(), self.file_offset[i:j].tolist(), strict=True):
            lo, up = max(s, start), min(e, end)
            out.append((lo, up - lo, kind, layer, fo + lo - s if kind == ExtentKind.DATA else -1))
        return out


class SupplyIndex:
    """Windows of the chain's supply map of one image, built on demand by ``build(start, end) -> Extents``."""

    def __init__(self, build: Callable[[int, int], Extents], virtual_size: int, block_size: int,
                 window_bytes: int = WINDOW_BYTES, max_runs: int = MAX_CACHED_RUNS,
                 build_after: int = BUILD_AFTER) -> None:
        self._build = build
        self._virtual_size = virtual_size
        # Windows are whole blocks, so no block is ever split between two of them.
        self._span = max(1, window_bytes // block_size) * block_size
        self._max_runs = max_runs
        self._windows: OrderedDict[int, SupplyWindow] = OrderedDict()
        self._runs = 0
        self._misses: dict[int, int] = {}
        self._build_after = build_after

    def lookup(self, start: int, end: int) -> list[tuple[int, int, int, int, int]] | None:
        """The runs of [start, end) as ``runs`` gives them, or None while its windows are not worth building."""
        span = self._span
        index = start // span
        if (end - 1) // span != index:
            return list(self.runs(start, end)) if self.covers(start, end) else None
        found = self._windows.get(index)
        if found is None:
            if not self.covers(start, end):
                return None
            found = self.window(index)
        else:
            self._windows.move_to_end(index)
        return found.rows(start, end)

    def covers(self, start: int, end: int) -> bool:
        """True when [start, end) can be answered from cached windows (counts a miss for each window that cannot).

        A window met ``build_after`` times is worth building: then this answers True and ``runs`` builds it.
        """
        span = self._span
        ready = True
        for index in range(start // span, (end - 1) // span + 1):
            if index in self._windows:
                continue
            misses = self._misses.get(index, 0) + 1
            if misses < self._build_after:
                if len(self._misses) >= _MAX_MISS_COUNTERS:
                    self._misses.clear()
                self._misses[index] = misses
                ready = False
        return ready

    def window(self, index: int) -> SupplyWindow:
        """The window holding virtual offsets [index * span, (index + 1) * span), built on first use (LRU)."""
        found = self._windows.get(index)
        if found is not None:
            self._windows.move_to_end(index)
            return found
        self._misses.pop(index, None)
        lo = index * self._span
        built = SupplyWindow.from_extents(self._build(lo, min(lo + self._span, self._virtual_size)))
        while self._windows and self._runs + len(built) > self._max_runs:
            _, old = self._windows.popitem(last=False)
            self._runs -= len(old)
        self._windows[index] = built
        self._runs += len(built)
        return built

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
        """(virtual start, length, kind, layer, file offset) of [start, end), clipped to it, in order."""
        span = self._span
        pos = start
        while pos < end:
            w = self.window(pos // span)
            hi = min(end, (pos // span + 1) * span)
            yield from w.rows(pos, hi)
            pos = hi

    def clear(self) -> None:
        self._windows.clear()
        self._misses.clear()
        self._runs = 0


def gather_spans(rows, max_span: int) -> Iterator[tuple[int, int, list[tuple[int, int, int, int]]]]:
    """Group DATA rows that follow each other in the virtual disk into spans of at most ``max_span`` bytes.

    Yields (virtual start, length, pieces) where each piece is (virtual start, length, layer, file offset);
    a copy then writes each span once instead of once per 4 KiB run of a fragmented chain.
    """
    pieces: list[tuple[int, int, int, int]] = []
    span_start = span_end = -1
    for start, length, kind, layer, file_offset in rows:
        if kind != ExtentKind.DATA:
            continue
        while length:
            if pieces and (start != span_end or span_end - span_start >= max_span):
                yield span_start, span_end - span_start, pieces
                pieces = []
            if not pieces:
                span_start = span_end = start
            n = min(length, max_span - (span_end - span_start))
            pieces.append((start, n, layer, file_offset))
            span_end = start + n
            start, length, file_offset = start + n, length - n, file_offset + n
    if pieces:
        yield span_start, span_end - span_start, pieces
