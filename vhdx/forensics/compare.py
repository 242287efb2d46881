"""Compare the content of two unrelated virtual disks (VHDX chains or raw images), like ``qemu-img compare``.

Ranges both disks read as zeros by their maps (unallocated, ZERO, UNMAPPED blocks) are skipped without reading;
the rest is read in chunks and compared with numpy, 512 bytes at a time. Past the smaller disk's end the larger
one must read zeros (unless ``strict``, where a size difference is itself a mismatch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from vhdx.disk.extents import ExtentKind
from vhdx.disk.image import VhdxImage

SECTOR = 512
CHUNK = 4 << 20


class RawDisk:
    """A raw image file opened read-only, with the ``virtual_size``/``readinto`` a VhdxImage offers."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.virtual_size = os.fstat(self._fd).st_size

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
        view[done:] = bytes(len(view) - done)
        return len(view)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> RawDisk:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class CompareResult:
    a: str
    b: str
    size_a: int
    size_b: int
    strict: bool
    first_mismatch: int | None  # first differing byte; None when identical (or only the sizes differ)
    extents: tuple[tuple[int, int], ...] = field(default=())  # differing 512-byte runs (all, or up to the first)

    @property
    def size_mismatch(self) -> bool:
        return self.strict and self.size_a != self.size_b

    @property
    def identical(self) -> bool:
        return self.first_mismatch is None and not self.size_mismatch

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "size_a": self.size_a, "size_b": self.size_b, "strict": self.strict,
                "identical": self.identical, "size_mismatch": self.size_mismatch,
                "first_mismatch": self.first_mismatch,
                "extents": [{"start": s, "length": n} for s, n in self.extents]}


def zero_runs(disk) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the ranges DISK's map says read as zeros; none known for a raw file."""
    if not isinstance(disk, VhdxImage):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ext = disk.extents()
    zero = ext.kind != ExtentKind.DATA
    return ext.start[zero], ext.end[zero]


def _inside(points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For sorted, disjoint ranges: whether each point lies in one of them."""
    if len(starts) == 0:
        return np.zeros(len(points), dtype=bool)
    idx = np.searchsorted(starts, points, side="right") - 1
    return (idx >= 0) & (points < ends[np.maximum(idx, 0)])


def ranges_to_read(lo: int, hi: int, skips: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[int, int]]:
    """Sub-ranges of [lo, hi) not covered by every skip set at once (where some disk may hold data)."""
    if hi <= lo:
        return []
    bounds = np.unique(np.clip(np.concatenate([[lo, hi], *[np.concatenate(s) for s in skips]]), lo, hi))
    seg_s, seg_e = bounds[:-1], bounds[1:]
    skip = np.ones(len(seg_s), dtype=bool)
    for starts, ends in skips:
        skip &= _inside(seg_s, starts, ends)
    read = ~skip
    if not read.any():
        return []
    # Coalesce neighbouring segments to read.
    edges = np.diff(np.concatenate(([0], read.astype(np.int8), [0])))
    first, last = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    return list(zip(seg_s[first].tolist(), seg_e[last].tolist(), strict=True))


def differing_runs(a: np.ndarray, b: np.ndarray, offset: int) -> tuple[int | None, list[tuple[int, int]]]:
    """First differing byte and the differing 512-byte runs of two equal-length buffers at virtual OFFSET."""
    diff = a != b
    if not diff.any():
        return None, []
    first = offset + int(np.argmax(diff))
    pad = (-len(diff)) % SECTOR
    sectors = np.concatenate((diff, np.zeros(pad, bool))).reshape(-1, SECTOR).any(axis=1)
    edges = np.diff(np.concatenate(([0], sectors.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    length = len(diff)
    runs = [(offset + s * SECTOR, min(e * SECTOR, length) - s * SECTOR)
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
    return first, runs


def _add_runs(runs: list[tuple[int, int]], new: list[tuple[int, int]]) -> None:
    for start, length in new:
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + length)
        else:
            runs.append((start, length))


def compare_disks(a, b, *, strict: bool = False, all_extents: bool = True, progress=None) -> CompareResult:
    """Compare the virtual content of A and B (VhdxImage or RawDisk).

    Args:
        a: first disk.
        b: second disk.
        strict: a size difference is a mismatch (qemu-img's -s); otherwise the larger disk's tail must be zeros.
        all_extents: find every differing run; False stops at the first mismatch.
        progress: called with the bytes examined so far.
    """
    size_a, size_b = a.virtual_size, b.virtual_size
    common, larger = min(size_a, size_b), (a if size_a > size_b else b)
    za, zb = zero_runs(a), zero_runs(b)
    first: int | None = None
    runs: list[tuple[int, int]] = []
    buf_a, buf_b = np.zeros(CHUNK, np.uint8), np.zeros(CHUNK, np.uint8)
    # The common part, then the larger disk's tail against zeros.
    plans = [(lo, hi, a, b) for lo, hi in ranges_to_read(0, common, [za, zb])]
    if size_a != size_b:
        plans += [(lo, hi, larger, None) for lo, hi in
                  ranges_to_read(common, max(size_a, size_b), [za if larger is a else zb])]
    for lo, hi, x, y in plans:
        for pos in range(lo, hi, CHUNK):
            n = min(CHUNK, hi - pos)
            x.readinto(pos, buf_a[:n])
            if y is None:
                buf_b[:n] = 0
            else:
                y.readinto(pos, buf_b[:n])
            at, new = differing_runs(buf_a[:n], buf_b[:n], pos)
            if at is not None:
                first = at if first is None else first
                _add_runs(runs, new)
                if not all_extents:
                    break
            if progress:
                progress(pos + n)
        if first is not None and not all_extents:
            break
    return CompareResult(os.path.abspath(_path(a)), os.path.abspath(_path(b)), size_a, size_b, strict, first,
                         tuple(runs))


def _path(disk) -> str:
    return str(disk.path)
