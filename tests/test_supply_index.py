"""Reads through the supply index (vhdx.disk.supply) equal the extent overlay and an in-memory model.

Random chains (depth 1-5, 1 or 2 MiB blocks per layer, 512 or 4096-byte sectors) get random writes, zero
writes and discards; every read request is answered three ways: the cached index (with tiny windows, so
requests cross windows and the LRU evicts), the old per-request extent overlay, and the model.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vhdx
from vhdx.disk.supply import SupplyIndex, gather_spans
from vhdx.ops.create import create

MiB = 1 << 20

op = st.tuples(st.sampled_from(["write", "zeros", "discard"]), st.floats(0, 1), st.floats(0, 1))
layer_ops = st.lists(op, min_size=0, max_size=6)


def _apply(image, model: np.ndarray, rng: np.random.Generator, kind: str, where: float, size: float,
           sector: int, block_size: int) -> None:
    sectors = len(model) // sector
    first = int(where * (sectors - 1))
    count = max(1, int(size * min(sectors - first, 3 * block_size // sector)))
    offset, length = first * sector, count * sector
    if kind == "write":
        data = rng.integers(1, 256, length, dtype=np.uint8)
        image.write(offset, data.tobytes())
        model[offset : offset + length] = data
    elif kind == "zeros":
        image.write_zeros(offset, length)
        model[offset : offset + length] = 0
    else:
        image.discard(offset, length)
        # Only blocks wholly inside the range are trimmed (a discard is a hint); they read as zeros.
        lo, hi = -(-offset // block_size) * block_size, (offset + length) // block_size * block_size
        end = offset + length
        if end == len(model):  # the disk's last, short block counts as whole
            hi = end
        if hi > lo:
            model[lo:hi] = 0


@given(depth=st.integers(1, 5), sector=st.sampled_from([512, 4096]), seed=st.integers(0, 2**32 - 1),
       blocks=st.lists(st.sampled_from([MiB, 2 * MiB]), min_size=6, max_size=6),
       ops=st.lists(layer_ops, min_size=6, max_size=6), extra_sectors=st.integers(0, 7),
       reads=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=12))
def test_reads_through_index_equal_overlay_and_model(tmp_path_factory, depth, sector, seed, blocks, ops,
                                                     extra_sectors, reads):
    folder = tmp_path_factory.mktemp("supply")
    size = 5 * MiB + extra_sectors * sector
    rng = np.random.default_rng(seed)
    model = np.zeros(size, dtype=np.uint8)
    paths = []
    for level in range(depth + 1):
        path = os.fspath(folder / (f"layer{level}.avhdx" if level else "base.vhdx"))
        if level:
            create(path, parent=paths[-1], block_size=blocks[level])
        else:
            create(path, size, block_size=blocks[0], logical_sector_size=sector)
        with vhdx.open(path, writable=True) as image:
            for kind, where, length in ops[level]:
                _apply(image, model, rng, kind, where, length, sector, image.block_size)
        paths.append(path)
    with vhdx.open(paths[-1]) as image:
        # Windows of one block and room for a few runs: requests cross windows and old windows are evicted.
        image._supply = SupplyIndex(image._chain_extents, image.virtual_size, image.block_size,
                                    window_bytes=image.block_size, max_runs=8, build_after=1)
        for where, length in [*reads, (0.0, 1.0)]:
            offset = int(where * (size - 1))
            n = max(1, int(length * (size - offset)))
            want = model[offset : offset + n].tobytes()
            assert image.supply.covers(offset, offset + n)
            assert image.read(offset, n) == want
            reference = bytearray(n)
            image._read_overlaid(offset, memoryview(reference))
            assert bytes(reference) == want


def test_missing_parent_does_not_fail_a_read_the_child_holds_alone(tmp_path):
    base, child = os.fspath(tmp_path / "base.vhdx"), os.fspath(tmp_path / "child.avhdx")
    create(base, 4 * MiB, block_size=MiB)
    create(child, parent=base, block_size=MiB)
    with vhdx.open(child, writable=True) as image:
        image.write(0, b"\x5a" * MiB)
    os.unlink(base)
    with vhdx.open(child) as image:
        assert image.read(4096, 4096) == b"\x5a" * 4096
        with pytest.raises(vhdx.VhdxError, match="parent not found"):
            image.read(2 * MiB, 4096)


def test_index_memory_is_bounded_by_runs_held():
    built = []

    def build(lo, hi):
        built.append(lo)
        # Alternating 512-byte runs: the worst case for the number of runs per window.
        from vhdx.disk.extents import Extents
        starts = np.arange(lo, hi, 512, dtype=np.int64)
        kinds = (np.arange(len(starts)) % 2 * 2).astype(np.uint8)
        return Extents(starts, np.full(len(starts), 512, np.int64), kinds, np.zeros(len(starts), np.int16),
                       np.where(kinds == 2, starts, -1))

    index = SupplyIndex(build, 64 * MiB, MiB, window_bytes=MiB, max_runs=3 * 2048)
    for w in range(64):
        list(index.runs(w * MiB, w * MiB + 4096))
    assert index._runs <= 3 * 2048 and len(index._windows) == 3
    list(index.runs(63 * MiB, 63 * MiB + 1))  # still cached: no rebuild
    assert built.count(63 * MiB) == 1


def test_gather_spans_joins_touching_data_runs_and_caps_their_size():
    rows = [(0, 4096, 2, 0, 100), (4096, 4096, 2, 1, 900), (8192, 4096, 1, -1, -1), (12288, 10000, 2, 0, 5000)]
    spans = list(gather_spans(rows, 8192))
    assert spans == [(0, 8192, [(0, 4096, 0, 100), (4096, 4096, 1, 900)]),
                     (12288, 8192, [(12288, 8192, 0, 5000)]),
                     (20480, 1808, [(20480, 1808, 0, 13192)])]


def test_windows_are_built_only_for_ranges_read_repeatedly():
    built = []

    def build(lo, hi):
        built.append(lo)
        from vhdx.disk.extents import Extents
        return Extents(np.array([lo], np.int64), np.array([hi - lo], np.int64), np.array([1], np.uint8),
                       np.array([-1], np.int16), np.array([-1], np.int64))

    index = SupplyIndex(build, 64 * MiB, MiB, window_bytes=MiB, build_after=3)
    assert [index.covers(w * MiB, w * MiB + 4096) for w in range(64)] == [False] * 64  # scattered: never built
    assert not index.covers(0, 4096)
    assert index.covers(0, 4096)  # third time: worth building
    list(index.runs(0, 4096))
    assert built == [0]
