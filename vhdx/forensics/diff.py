"""What the layers between a child and one of its ancestors wrote, as merged virtual extents with hashes.

A layer "wrote" a range when its BAT says it holds it: any payload block state other than NOT_PRESENT
(data, or ZERO/UNMAPPED/UNDEFINED, which hide the parent's bytes behind zeros). By default the unit is the
payload block (what the layer allocated); with ``sectors=True`` a PARTIALLY_PRESENT block counts only the
sectors whose bitmap bit is set. Ranges come from the BAT and bitmap arrays (numpy), never from comparing
bytes; only the hashes read data: the new content through the child, the old content through the ancestor.

References: [MS-VHDX] §2.4 (sector bitmap), §2.5.1.1 (payload block states).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from vhdx.disk.extents import ExtentKind, bitmap_runs
from vhdx.disk.image import VhdxImage
from vhdx.errors import InvalidRequestError
from vhdx.forensics.hashing import MultiHasher, feed, image_pieces, zero_pieces
from vhdx.forensics.layers import find_layer
from vhdx.format import constants as c
from vhdx.structures.bat import RawWindow

# Unpacked sector bitmap bits (one byte each) read at a time for the partially present blocks of a window.
BITMAP_BITS = 1 << 24


@dataclass(frozen=True)
class DiffExtent:
    start: int
    length: int
    layers: tuple[int, ...]  # depths (0 = CHILD) of the layers that hold part of this extent
    new_digest: str  # content through CHILD
    old_digest: str | None  # content through ANCESTOR (None when there is no ancestor to read)


@dataclass(frozen=True)
class DiffResult:
    child: str
    ancestor: str | None
    layers: tuple[str, ...]  # the layers compared, CHILD first (ANCESTOR excluded)
    granularity: str  # "block" or "sector"
    algorithm: str
    virtual_size: int
    extents: tuple[DiffExtent, ...]
    absent: tuple[tuple[int, int], ...]  # orphan mode: ranges the child's chain does not hold (read as zeros)
    orphan: bool

    @property
    def written_bytes(self) -> int:
        return sum(e.length for e in self.extents)

    def to_json(self) -> dict:
        return {
            "child": self.child, "ancestor": self.ancestor, "layers": list(self.layers),
            "granularity": self.granularity, "algorithm": self.algorithm, "virtual_size": self.virtual_size,
            "written_bytes": self.written_bytes, "orphan": self.orphan,
            "extents": [{"start": e.start, "length": e.length, "layers": list(e.layers),
                         f"new_{self.algorithm}": e.new_digest, f"old_{self.algorithm}": e.old_digest}
                        for e in self.extents],
            "absent": [{"start": s, "length": n} for s, n in self.absent],
        }


def held_ranges(layer: VhdxImage, *, sectors: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the virtual ranges one file holds, sorted; blocks, or sectors from the bitmaps.

    One pass over the BAT windows that hold entries (holes of the BAT are not read): runs of held blocks
    come out as one range each, so memory and time grow with what the file holds, not with the disk size.
    """
    parts_s, parts_e = [], []
    for window in layer.bat.raw_windows():
        s, e = _window_held(layer, window, sectors)
        parts_s.append(s)
        parts_e.append(e)
    if not parts_s:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(parts_s), np.concatenate(parts_e)


def _window_held(layer: VhdxImage, window: RawWindow, sectors: bool) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the ranges one BAT window holds (clipped to the layer's virtual size), sorted."""
    g = layer.geometry
    bs, n = g.block_size, len(window.payload)
    if window.uniform is not None:  # one repeated entry: the window is one run or nothing, no per-block arrays
        state = window.uniform & c.BAT_STATE_MASK
        if state == c.BatState.NOT_PRESENT:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if not (sectors and state == c.BatState.PARTIALLY_PRESENT):
            return (np.array([window.b0 * bs], np.int64),
                    np.array([min((window.b0 + n) * bs, g.virtual_size)], np.int64))
    states = window.states()
    held = states != c.BatState.NOT_PRESENT
    partial = sectors & (states == c.BatState.PARTIALLY_PRESENT)
    held &= ~partial
    edges = np.flatnonzero(np.diff(np.concatenate(([False], held, [False])).astype(np.int8)))
    starts = (edges[::2] + window.b0).astype(np.int64) * bs
    ends = np.minimum((edges[1::2] + window.b0).astype(np.int64) * bs, g.virtual_size)
    blocks = np.flatnonzero(partial) + window.b0
    if not len(blocks):
        return starts, ends
    parts_s, parts_e = [starts], [ends]
    batch = max(1, BITMAP_BITS // g.sectors_per_block)  # unpacked bits of a batch stay bounded
    for i in range(0, len(blocks), batch):
        some = blocks[i : i + batch].astype(np.int64)
        runs = bitmap_runs(layer.read_bitmap_bits(some), some * bs, np.zeros(len(some), np.int64),
                           g.logical_sector_size)
        data = runs.kind == ExtentKind.DATA
        s = runs.start[data]
        e = np.minimum(s + runs.length[data], g.virtual_size)
        keep = e > s
        parts_s.append(s[keep])
        parts_e.append(e[keep])
    s, e = np.concatenate(parts_s), np.concatenate(parts_e)
    order = np.argsort(s, kind="stable")
    return s[order], e[order]


def merge_ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union of ranges (touching ones merge); returns (starts, ends, group of each input range)."""
    if len(starts) == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    order = np.lexsort((ends, starts))
    s, e = starts[order], ends[order]
    reach = np.maximum.accumulate(e)
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] > reach[:-1]
    first = np.flatnonzero(new)
    group_sorted = np.cumsum(new) - 1
    group = np.empty_like(group_sorted)
    group[order] = group_sorted
    return s[first], np.maximum.reduceat(e, first), group


def _digest(image: VhdxImage | None, start: int, end: int, algorithm: str) -> str:
    sink = MultiHasher((algorithm,))
    if image is None:
        feed(zero_pieces(end - start), sink)
        return sink.finish()[algorithm]
    inside = max(start, min(end, image.virtual_size))
    if inside > start:
        feed(image_pieces(image, start, inside), sink)
    if end > inside:  # beyond a smaller ancestor's end the chain reads zeros
        feed(zero_pieces(end - inside), sink)
    return sink.finish()[algorithm]


def diff_layers(child: VhdxImage, ancestor: str | None = None, *, sectors: bool = False,
                algorithm: str = "sha256", hashes: bool = True) -> DiffResult:
    """Extents written by the layers from ``child`` down to (not including) ``ancestor`` (default: its parent).

    In orphan mode (``child`` opened with ``orphan=True``) only the child itself is compared, the old content
    cannot be read (``old_digest`` None) and the ranges it does not hold are listed in ``absent``.
    """
    hashlib.new(algorithm)
    layers = child.layers
    orphan = child.options.orphan and child.has_parent
    if ancestor is not None:
        if orphan:
            raise InvalidRequestError("comparing with an ancestor needs the chain; a disk read alone (orphan) has none")
        k = find_layer(child, ancestor)
        if k == 0:
            raise InvalidRequestError("the ancestor is the child itself")
        base: VhdxImage | None = layers[k]
    else:
        k = 1
        base = layers[1] if len(layers) > 1 else None
    starts, ends, ids = [], [], []
    for depth in range(k):
        s, e = held_ranges(layers[depth], sectors=sectors)
        keep = s < child.virtual_size
        s, e = s[keep], np.minimum(e[keep], child.virtual_size)
        starts.append(s)
        ends.append(e)
        ids.append(np.full(len(s), depth, dtype=np.int64))
    m_start, m_end, group = merge_ranges(np.concatenate(starts), np.concatenate(ends))
    who = np.zeros((len(m_start), k), dtype=bool)
    who[group, np.concatenate(ids)] = True
    extents = []
    for i, (s, e) in enumerate(zip(m_start.tolist(), m_end.tolist(), strict=True)):
        new = _digest(child, s, e, algorithm) if hashes else ""
        old = _digest(base, s, e, algorithm) if hashes and base is not None else None
        extents.append(DiffExtent(s, e - s, tuple(np.flatnonzero(who[i]).tolist()), new, old))
    absent: tuple = ()
    if orphan:
        ext = child.extents()
        gone = ext.kind == ExtentKind.ABSENT
        absent = tuple(zip(ext.start[gone].tolist(), ext.length[gone].tolist(), strict=True))
    return DiffResult(
        child=os.path.abspath(child.path), ancestor=os.path.abspath(base.path) if base is not None else None,
        layers=tuple(os.path.abspath(layer.path) for layer in layers[:k]),
        granularity="sector" if sectors else "block", algorithm=algorithm, virtual_size=child.virtual_size,
        extents=tuple(extents), absent=absent, orphan=orphan)
