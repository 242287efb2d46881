"""Runs that read as zeros, by BAT state and by content.

By state: ZERO, UNMAPPED (trimmed) and UNDEFINED all read as zeros, and users ask which. By content: all-zero
granules inside allocated blocks, which a sparse raw output or an NBD client may skip.

References: [MS-VHDX] §2.5.1.1 (payload block states).
"""

from __future__ import annotations

from vhdx.lazy import np


def split_by_state(start: int, length: int, states: np.ndarray, block_size: int) -> list[tuple[int, int, int]]:
    """Cut the run [start, start + length) of one layer where the BAT state of its blocks changes.

    Args:
        start: virtual byte offset of the run.
        length: bytes in the run (> 0).
        states: payload block states of the layer that supplies the run (``Bat.states``).
        block_size: that layer's block size.

    Returns:
        ``(start, length, state)`` for each stretch of blocks in one state, in order, covering the run exactly.
    """
    b0, b1 = start // block_size, (start + length - 1) // block_size + 1
    s = states[b0:b1]
    cut = np.flatnonzero(s[1:] != s[:-1]) + 1
    edges = (b0 + cut) * block_size
    starts = np.concatenate(([start], edges))
    ends = np.concatenate((edges, [start + length]))
    return list(zip(starts.tolist(), (ends - starts).tolist(), s[np.concatenate(([0], cut))].tolist(), strict=True))


def rows_with_data(rows: np.ndarray) -> np.ndarray:
    """Which rows of a 2-D uint64 array hold a non-zero word (one bool per row), cheaper than ``any(axis=1)``.

    ``any`` casts every word to bool first; most rows of real data have a non-zero first word, so only the
    rows whose first word is zero are OR-reduced. When many are, all rows are (no gather of a big subset).
    """
    filled = rows[:, 0] != 0
    candidates = np.flatnonzero(~filled)
    if 4 * len(candidates) > len(rows):
        return np.bitwise_or.reduce(rows, axis=1) != 0
    if len(candidates):
        filled[candidates] = np.bitwise_or.reduce(rows[candidates], axis=1) != 0
    return filled


ZERO_GRANULE = 4096  # bytes: the smallest zero run left out (as qemu-img convert's default -S 4k), file-system block


def nonzero_runs(buf, base: int, granule: int = ZERO_GRANULE) -> list[tuple[int, int]]:
    """The runs of ``buf`` to write: all of it except whole all-zero granules.

    Granules are aligned to the absolute offset (``base`` is the offset of ``buf[0]``), so a skipped run can be
    a hole of a file written at the same offsets; a partial granule at either end is always written.

    Returns:
        ``(start, length)`` pairs relative to ``buf``, in order, disjoint and not touching.
    """
    data = np.frombuffer(buf, dtype=np.uint8)
    n = len(data)
    head = min((-base) % granule, n)
    body = (n - head) // granule
    granules = data[head : head + body * granule]
    if body and head % 8 == 0 and granule % 8 == 0:
        written = rows_with_data(granules.view(np.uint64).reshape(body, -1))
    else:
        written = granules.reshape(body, -1).any(axis=1) if body else np.zeros(0, dtype=bool)
    flags = np.concatenate(([head > 0], written, [head + body * granule < n]))
    edges = np.concatenate(([0], head + np.arange(body + 1, dtype=np.int64) * granule, [n]))
    step = np.diff(np.concatenate(([0], flags.astype(np.int8), [0])))
    starts, ends = edges[np.flatnonzero(step == 1)], edges[np.flatnonzero(step == -1)]
    return [(s, e - s) for s, e in zip(starts.tolist(), ends.tolist(), strict=True) if e > s]


def nonzero_granule_runs(buf, cuts: np.ndarray, granule: int = ZERO_GRANULE) -> tuple[np.ndarray, np.ndarray]:
    """The runs of whole granules of ``buf`` that hold a non-zero byte, never crossing a cut.

    One numpy pass over a whole copy buffer: a fragmented chain fills it with hundreds of short pieces, and
    scanning each on its own would cost more in numpy calls than the scan itself.

    Args:
        buf: bytes whose length is a multiple of ``granule`` (its offset 0 is the start of a granule).
        cuts: granule-aligned offsets into ``buf`` where a run must start afresh (the starts of segments that
            do not follow each other on the output).
        granule: bytes per granule (a multiple of 8).

    Returns:
        ``(starts, ends)``: byte offsets into ``buf``, int64 arrays, in order.
    """
    filled = rows_with_data(np.frombuffer(buf, dtype=np.uint64).reshape(-1, granule // 8))
    n = len(filled)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    fresh = np.zeros(n + 1, dtype=bool)
    fresh[np.asarray(cuts, dtype=np.int64) // granule] = True
    fresh[n] = True
    before = np.concatenate(([False], filled[:-1]))
    after = np.concatenate((filled[1:], [False]))
    first = filled & (~before | fresh[:n])
    last = filled & (~after | fresh[1:])
    return np.flatnonzero(first) * granule, (np.flatnonzero(last) + 1) * granule
