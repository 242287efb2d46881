"""Zero runs inside allocated data: which bytes a sparse raw output writes (whole aligned all-zero granules are
left out, everything else is written, so the output reads the same bytes)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from vhdx.disk.zero_runs import ZERO_GRANULE, nonzero_runs

G = ZERO_GRANULE


def test_an_all_zero_buffer_writes_nothing():
    assert nonzero_runs(bytes(8 * G), 0) == []


def test_only_granules_with_a_nonzero_byte_are_written():
    buf = bytearray(8 * G)
    buf[G + 5] = 1
    buf[5 * G] = 2
    buf[6 * G - 1] = 3
    assert nonzero_runs(buf, 0) == [(G, G), (5 * G, G)]


def test_touching_written_granules_are_one_run():
    buf = bytearray(4 * G)
    buf[G] = buf[2 * G] = 1
    assert nonzero_runs(buf, 0) == [(G, 2 * G)]


def test_granules_align_to_the_absolute_offset_and_partial_ends_are_written():
    # base 512: the first 3584 bytes complete a granule that started before buf; they are written.
    buf = bytes(3 * G)
    assert nonzero_runs(buf, 512) == [(0, G - 512), (3 * G - 512, 512)]


@given(st.integers(0, 64), st.lists(st.integers(0, 20 * G - 1), max_size=12), st.integers(0, 7))
def test_writing_the_runs_into_zeros_rebuilds_the_buffer(length_sectors, marks, base_sectors):
    n = length_sectors * 512 + 3 * G
    buf = bytearray(n)
    for m in marks:
        buf[m % n] = 0xA5
    out = bytearray(n)
    runs = nonzero_runs(buf, base_sectors * 512)
    for start, length in runs:
        out[start : start + length] = buf[start : start + length]
    assert out == buf
    skipped = n - sum(length for _, length in runs)
    assert skipped % G == 0  # only whole granules are left out
    ends = [s + length for s, length in runs]
    assert all(e < s for e, s in zip(ends, [s for s, _ in runs][1:], strict=False))  # disjoint, not touching
    assert np.all(np.diff([s for s, _ in runs]) > 0) if len(runs) > 1 else True


def test_granule_runs_of_a_buffer_join_data_granules_and_restart_at_each_cut():
    from vhdx.disk.zero_runs import nonzero_granule_runs

    buf = bytearray(8 * G)
    for g in (0, 1, 2, 5, 6):
        buf[g * G + 100] = 1
    starts, ends = nonzero_granule_runs(buf, np.array([0, 2 * G, 6 * G]))
    assert list(zip(starts.tolist(), ends.tolist(), strict=True)) == [(0, 2 * G), (2 * G, 3 * G), (5 * G, 6 * G),
                                                                      (6 * G, 7 * G)]


def test_granule_runs_of_an_all_zero_or_empty_buffer_are_none():
    from vhdx.disk.zero_runs import nonzero_granule_runs

    for buf in (bytes(4 * G), b""):
        starts, ends = nonzero_granule_runs(buf, np.array([0]))
        assert len(starts) == len(ends) == 0


def test_a_row_whose_only_data_is_past_its_first_word_holds_data():
    from vhdx.disk.zero_runs import rows_with_data

    rows = np.zeros((8, 512), dtype=np.uint64)
    rows[3, 511] = 1  # the first word, the one looked at first, is zero
    rows[5, 0] = 1
    assert rows_with_data(rows).tolist() == [False, False, False, True, False, True, False, False]


@given(st.lists(st.sampled_from(["zero", "first", "last", "middle"]), min_size=0, max_size=40))
def test_rows_with_data_agrees_with_any_for_every_mix_of_rows(kinds):
    from vhdx.disk.zero_runs import rows_with_data

    rows = np.zeros((len(kinds), 64), dtype=np.uint64)
    for i, kind in enumerate(kinds):
        if kind != "zero":
            rows[i, {"first": 0, "last": 63, "middle": 17}[kind]] = 1 << (i % 64)
    assert rows_with_data(rows).tolist() == rows.any(axis=1).tolist()
