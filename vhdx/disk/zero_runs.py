"""Which BAT state makes a run read as zeros: ZERO, UNMAPPED (trimmed) and UNDEFINED all do, and users ask which.

References: [MS-VHDX] §2.5.1.1 (payload block states).
"""

from __future__ import annotations

import numpy as np


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
