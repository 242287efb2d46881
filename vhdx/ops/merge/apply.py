"""Carrying a merge plan out on the destination (I/O): zero fills, copies (or shared extents), two commits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np

from vhdx.disk.image import VhdxImage
from vhdx.errors import MergeError
from vhdx.format import constants as c
from vhdx.io import COPY_CHUNK, ImageIO, WriteBehind
from vhdx.ops.merge.inputs import dest_kind_of
from vhdx.ops.merge.plan import MergePlan

PROGRESS_STEP = 64 * c.MiB


def apply_merge(dest: VhdxImage, plan: MergePlan, sources: Sequence[ImageIO], *,
                progress: Callable[[int, int], None] | None = None) -> int:
    """Carry out ``plan`` on ``dest`` (open for writing, session begun); returns the bytes copied and zeroed.

    Order: grow the file; zero fills; copies; one commit for sector bitmap entries and bits (the data is
    flushed first); one commit for the payload BAT entries. A crash between the two commits leaves bits set
    only where the layers above still hide them, so every state in between reads the same through the chain.
    """
    io, writer = dest.io, dest.writer
    if dest.block_size != plan.dest_block_size or dest_kind_of(dest) != plan.dest_kind:
        raise MergeError("the destination's geometry differs from the plan", path=dest.path)
    if plan.final_file_size > io.real_size:
        io.truncate(plan.final_file_size)
    total = plan.bytes_to_copy + plan.bytes_to_zero
    done = 0
    for dst, n in zip(plan.zero_dst.tolist(), plan.zero_len.tolist(), strict=True):
        io.write_zeros(dst, n)  # (from the shared zero pages: nothing is allocated per run)
        done += n
        if progress:
            progress(done, total)
    # Buffers no larger than the largest run: a small merge must not pay for an 8 MiB allocation.
    buf = bytearray(min(COPY_CHUNK, int(plan.copy_len.max()))) if len(plan.copy_len) else None
    # Write-back of each copied range starts while the next one is copied; the commit's flush below waits
    # for the rest. (Flushing the file on a timer instead made every flush a device cache flush.)
    with WriteBehind(io.fd) if io.fd is not None and io.durable else nullcontext() as behind:
        for layer, src, dst, n in zip(plan.copy_layer.tolist(), plan.copy_src.tolist(), plan.copy_dst.tolist(),
                                      plan.copy_len.tolist(), strict=True):
            for pos in range(0, n, PROGRESS_STEP):
                step = min(PROGRESS_STEP, n - pos)
                io.copy_from(sources[layer], src + pos, dst + pos, step, buf)
                if behind is not None:
                    behind.wrote(dst + pos, step)
                done += step
                if progress:
                    progress(done, total)
    for chunk, offset in zip(plan.sb_chunks.tolist(), plan.sb_offsets.tolist(), strict=True):
        writer.set_bitmap_entry(chunk, c.SbState.PRESENT, offset)
    _stage_bitmaps(dest, plan)
    if writer.pending:  # (nothing staged: the BAT commit below flushes the data first all the same)
        writer.commit()
    for state in np.unique(plan.bat_states).tolist():
        sel = plan.bat_states == state
        writer.set_payload(plan.bat_blocks[sel], state, plan.bat_offsets[sel])
    writer.commit()
    return done


def _stage_bitmaps(dest: VhdxImage, plan: MergePlan) -> None:
    """Stage the final sector bits of each changed block, one span per chunk (through the log)."""
    if not len(plan.bitmap_blocks):
        return
    g = dest.geometry
    per = g.bitmap_bytes_per_block
    chunks = plan.bitmap_blocks // g.chunk_ratio
    for chunk in np.unique(chunks).tolist():
        sel = np.flatnonzero(chunks == chunk)
        within = plan.bitmap_blocks[sel] % g.chunk_ratio
        lo, hi = int(within.min()), int(within.max()) + 1
        base = dest.bat.bitmap_at(chunk)[1] + lo * per
        span = np.frombuffer(dest.io.read_at(base, (hi - lo) * per), np.uint8).reshape(hi - lo, per).copy()
        span[within - lo] = plan.bitmap_bytes[sel]
        dest.writer.stage(base, span.tobytes())
