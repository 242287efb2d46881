"""``overlay_stack``: each piece of the top layer's range comes from the first layer of the stack that holds it.

Checked against a unit-by-unit model: every layer painted over a small range, the first non-ABSENT one wins.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from vhdx.disk.extents import ExtentKind, Extents, coalesce, overlay_stack

UNIT = 512
KINDS = (ExtentKind.ABSENT, ExtentKind.ZERO, ExtentKind.DATA)


def _extents(runs: list[tuple[int, int, int, int]]) -> Extents:
    """(start unit, length units, kind, file offset) rows -> Extents in bytes."""
    start, length, kind, fo = (np.array(col, dtype=np.int64) for col in zip(*runs, strict=True))
    return Extents(start * UNIT, length * UNIT, kind.astype(np.uint8), np.full(len(runs), -1, np.int16),
                   np.where(kind == ExtentKind.DATA, fo, -1))


@st.composite
def stacks(draw):
    """A top layer over [lo, hi) and lower layers, each over a range inside the one above it."""
    lo = draw(st.integers(0, 8))
    hi = lo + draw(st.integers(1, 48))
    layers = []
    for _ in range(draw(st.integers(1, 6))):
        runs, pos = [], lo
        while pos < hi:
            n = draw(st.integers(1, hi - pos))
            kind = draw(st.sampled_from(KINDS))
            runs.append((pos, n, int(kind), draw(st.integers(0, 1000)) * UNIT))
            pos += n
        layers.append(coalesce(_extents(runs)))  # as layer_extents gives them
        if hi - lo > 1 and draw(st.booleans()):  # the next layer sees only part of this range
            a = draw(st.integers(lo, hi - 1))
            lo, hi = a, draw(st.integers(a + 1, hi))
    return layers


def _painted(stack: list[Extents]) -> dict[int, tuple[int, int, int]]:
    """unit -> (kind, depth, file offset) of the first layer holding it (ABSENT, -1, -1 where none does)."""
    top = stack[0]
    out = {}
    for unit in range(int(top.start[0]) // UNIT, int(top.end[-1]) // UNIT):
        out[unit] = (int(ExtentKind.ABSENT), -1, -1)
        for depth, ext in enumerate(stack):
            i = np.flatnonzero((ext.start <= unit * UNIT) & (ext.end > unit * UNIT))
            if len(i) and ext.kind[i[0]] != ExtentKind.ABSENT:
                k = int(ext.kind[i[0]])
                fo = int(ext.file_offset[i[0]]) + unit * UNIT - int(ext.start[i[0]]) if k == ExtentKind.DATA else -1
                out[unit] = (k, depth, fo)
                break
    return out


def _units(ext: Extents) -> dict[int, tuple[int, int, int]]:
    out = {}
    for start, length, kind, layer, fo in ext.rows():
        for unit in range(start // UNIT, (start + length) // UNIT):
            out[unit] = (kind, layer, fo + unit * UNIT - start if kind == ExtentKind.DATA else -1)
    return out


@given(stacks())
def test_each_piece_comes_from_the_first_layer_that_holds_it(stack):
    assert _units(overlay_stack(stack)) == _painted(stack)


@given(stacks())
def test_the_overlay_is_coalesced_and_covers_the_top_range_without_gaps(stack):
    out = overlay_stack(stack)
    assert int(out.start[0]) == int(stack[0].start[0]) and int(out.end[-1]) == int(stack[0].end[-1])
    assert np.array_equal(out.start[1:], out.end[:-1])
    same = (out.kind[1:] == out.kind[:-1]) & (out.layer[1:] == out.layer[:-1])
    continues = (out.kind[1:] != ExtentKind.DATA) | (out.file_offset[1:] == out.file_offset[:-1] + out.length[:-1])
    assert not (same & continues).any()
