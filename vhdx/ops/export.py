"""Flatten a virtual disk (its whole chain) into a raw image.

Only runs that hold data are read; runs that read as zeros (blocks not present, ZERO or trimmed) are left as holes
in a sparse output file, so a 10 GiB disk with 20 MiB of data costs 20 MiB of I/O. Every whole 4 KiB granule of
the disk that reads as zeros is a hole of the output, also inside the data and where data meets a run of zeros
(:func:`vhdx.disk.zero_runs.nonzero_granule_runs`, one numpy pass per 8 MiB buffer), as ``qemu-img convert`` does.
With ``sync`` a helper thread starts the write-back of each buffer once it is written (``vhdx.io.WriteBehind``).
``sparse=False`` (``--no-sparse``) writes every byte: a fully allocated file. A device or FIFO is written in place,
every byte in order (it is not known to read zeros where nothing is written), never punched.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vhdx.disk.extents import ExtentKind
from vhdx.disk.image import VhdxImage
from vhdx.disk.zero_runs import ZERO_GRANULE, nonzero_granule_runs
from vhdx.errors import InvalidRequestError, VhdxError
from vhdx.io import COPY_CHUNK, WriteBehind
from vhdx.ops import output


def export_raw(image: VhdxImage, out_path: str | os.PathLike, *, overwrite: bool = False,
               progress: Callable[[int], None] | None = None, sync: bool = False, sparse: bool = True) -> int:
    """Write the virtual disk to ``out_path`` as a raw image; returns the bytes written.

    A regular file is written as a temporary and renamed at the end, so an interrupted export never leaves
    a complete-looking but partial image behind. ``sync`` makes it durable (fsync) before the rename; like
    cp and qemu-img, the default leaves write-back to the OS. See ``vhdx.ops.output`` for what an output may be.
    """
    destination = output.resolve(out_path, overwrite=overwrite, sources=output.chain_identities(image), raw=True)
    if destination.in_place:
        fd = output.open_in_place(destination)
        try:
            return _stream(image, fd, destination, progress, sync)
        finally:
            os.close(fd)
    with output.staged(destination) as (_tmp, fd):
        if not sparse:
            return _stream(image, fd, destination, progress, sync)
        return _copy_sparse(image, fd, destination.target, progress, sync)


def _copy_sparse(image: VhdxImage, fd: int, path: str, progress, sync: bool) -> int:
    try:
        os.ftruncate(fd, image.virtual_size)
    except OSError as exc:
        raise VhdxError(f"cannot resize file: {exc.strerror}", path=path) from None
    readers = [layer.io for layer in image.layers]
    ext = image.extents()
    data = ext.kind == ExtentKind.DATA
    view = memoryview(bytearray(COPY_CHUNK))
    written = 0
    with WriteBehind(fd) if sync else contextlib.nullcontext() as behind:
        for batch in _batches(ext.start[data], ext.length[data], ext.layer[data], ext.file_offset[data], len(view)):
            for layer, pieces in batch.reads:
                readers[layer].read_pieces(view, pieces)
            for lo, hi in batch.zeros:  # after the reads: a read for several runs may have covered a gap
                view[lo:hi] = _ZEROS[: hi - lo] if hi - lo <= len(_ZEROS) else bytes(hi - lo)
            starts, ends = nonzero_granule_runs(view[: batch.used], batch.cuts)
            shift = batch.shift[batch.cuts.searchsorted(starts, "right") - 1]
            ends = np.minimum(ends, image.virtual_size - shift)  # the last granule of a disk may end past it
            for lo, hi, to in zip(starts.tolist(), ends.tolist(), (starts + shift).tolist(), strict=True):
                _write(fd, view[lo:hi], to, path)
            written += int((ends - starts).sum())
            if behind is not None:
                behind.advance(batch.virtual_end)
            if progress:
                progress(batch.virtual_end)
    if progress:
        progress(image.virtual_size)
    if sync:
        _fsync(fd, path)
    return written


# Longest stretch between two runs of the deepest layer that one read of its file may fetch and throw away.
COVER_GAP = 64 << 10


@dataclass
class _Batch:
    """One buffer's worth of the copy: what to read where, what to zero, and how buffer offsets map to the disk."""

    # (layer, [(buffer lo, buffer hi, file offset), ...]): the deepest layer first, since its reads may cover gaps
    # that the pieces of other layers (which never overlap each other) then fill
    reads: list[tuple[int, list[tuple[int, int, int]]]]
    zeros: list[tuple[int, int]]  # buffer ranges no run fills (they read as zeros)
    used: int  # bytes of the buffer in use, whole granules
    cuts: np.ndarray  # buffer offsets where a segment starts (0 first)
    shift: np.ndarray  # virtual offset minus buffer offset, per segment
    virtual_end: int  # the disk is copied up to here once this batch is written


def _batches(start: np.ndarray, length: np.ndarray, layer: np.ndarray, file_offset: np.ndarray, cap: int):
    """Lay the data runs of a disk out in buffers of ``cap`` bytes (a multiple of the granule); yields ``_Batch``.

    Runs are packed in segments: stretches of whole granules of the disk that hold data, one after the other in
    a stream cut into buffers, so that every granule of a segment is scanned with the bytes the disk has there
    (zeros between runs). A run continues the segment of the run before when it starts in the granule where that
    one ends or the next. All of it is planned with numpy: the copy loop only reads, zeroes and writes.

    A fragmented chain splits the base's data into many runs around the children's small writes: the runs of
    the deepest layer that continue one stretch of its file (same file offset minus virtual offset), in one
    segment, with at most ``COVER_GAP`` between them, are fetched by one read per buffer; the runs in the gaps
    come from shallower layers or are zeros, and are read or zeroed after it, over the bytes read there.
    """
    g = ZERO_GRANULE
    n = len(start)
    if n == 0:
        return
    end = start + length
    new_seg = np.ones(n, dtype=bool)
    new_seg[1:] = start[1:] // g > -(-end[:-1] // g)
    seg = np.cumsum(new_seg) - 1
    seg_first = np.flatnonzero(new_seg)
    seg_last = np.append(seg_first[1:], n) - 1
    seg_vlo = start[seg_first] // g * g
    seg_vhi = -(-end[seg_last] // g) * g
    seg_pos = np.concatenate(([0], np.cumsum(seg_vhi - seg_vlo)[:-1]))  # stream offset of each segment
    row_lo = seg_pos[seg] + start - seg_vlo[seg]
    row_hi = row_lo + length

    # Stretches of the deepest layer read at once: group id per row (-1: read alone) and the stretch's end.
    group = np.full(n, -1, dtype=np.int64)
    group_hi = row_hi.copy()
    deepest = int(layer.max())
    deep = np.flatnonzero(layer == deepest)
    if len(deep) > 1:
        a, b = deep[:-1], deep[1:]
        joined = ((file_offset[b] - start[b] == file_offset[a] - start[a]) & (start[b] - end[a] <= COVER_GAP)
                  & (seg[a] == seg[b]))
        gid = np.concatenate(([0], np.cumsum(~joined)))
        sizes = np.bincount(gid)
        group[deep] = np.where(sizes[gid] > 1, gid, -1)
        last = np.cumsum(sizes) - 1
        group_hi[deep] = row_hi[deep[last[gid]]]

    # Pieces: rows cut at buffer boundaries.
    b0, b1 = row_lo // cap, (row_hi - 1) // cap
    count = b1 - b0 + 1
    row = np.repeat(np.arange(n), count)
    k = np.arange(len(row)) - np.repeat(np.cumsum(count) - count, count)
    batch = b0[row] + k
    lo = np.maximum(row_lo[row], batch * cap)
    hi = np.minimum(row_hi[row], (batch + 1) * cap)
    p_layer = layer[row]
    p_fo = file_offset[row] + lo - row_lo[row]
    p_group = group[row]
    # The first piece of a stretch in each buffer reads to the stretch's end (or the buffer's); the others none.
    read_hi = hi.copy()
    grouped = np.flatnonzero(p_group >= 0)
    if len(grouped):
        key_group, key_batch = p_group[grouped], batch[grouped]
        first = np.ones(len(grouped), dtype=bool)
        first[1:] = (key_group[1:] != key_group[:-1]) | (key_batch[1:] != key_batch[:-1])
        read_hi[grouped[first]] = np.minimum(group_hi[row[grouped[first]]], (batch[grouped[first]] + 1) * cap)
        read_hi[grouped[~first]] = lo[grouped[~first]]
    reading = read_hi > lo

    batches, edges = np.unique(batch, return_index=True)
    edges = np.append(edges, len(batch))
    for i, bn in enumerate(batches.tolist()):
        p0, p1 = int(edges[i]), int(edges[i + 1])
        base = bn * cap
        sel = slice(p0, p1)
        # The pieces that read, by layer (the deepest first, each layer's in buffer order), one group per layer.
        r = np.flatnonzero(reading[sel]) + p0
        r = r[np.argsort(np.where(p_layer[r] == deepest, -1, p_layer[r]), kind="stable")]
        edges_r = [0, *(np.flatnonzero(np.diff(p_layer[r])) + 1).tolist(), len(r)]
        # (one conversion to Python lists per buffer, sliced per layer: a 17-layer chain has 17 groups per buffer)
        r_lo, r_hi, r_fo, r_layer = ((lo[r] - base).tolist(), (read_hi[r] - base).tolist(), p_fo[r].tolist(),
                                     p_layer[r].tolist())
        reads = [(r_layer[a], list(zip(r_lo[a:b], r_hi[a:b], r_fo[a:b], strict=True)))
                 for a, b in itertools.pairwise(edges_r) if b > a]
        used = -(-(int(hi[p1 - 1]) - base) // g) * g
        # Gaps: before the first piece, between pieces, and up to the end of the last granule.
        gap_lo = np.concatenate(([base], hi[sel])) - base
        gap_hi = np.concatenate((lo[sel], [base + used])) - base
        open_ = gap_hi > gap_lo
        zeros = list(zip(gap_lo[open_].tolist(), gap_hi[open_].tolist(), strict=True))
        # Segments met by this buffer: the one it starts in, and those that start in it.
        s0 = int(np.searchsorted(seg_pos, base, "right")) - 1
        s1 = int(np.searchsorted(seg_pos, base + used, "left"))
        cuts = np.maximum(seg_pos[s0:s1], base) - base
        shift = seg_vlo[s0:s1] - seg_pos[s0:s1] + base
        yield _Batch(reads, zeros, used, cuts, shift, int(start[row[p1 - 1]] + hi[p1 - 1] - row_lo[row[p1 - 1]]))


# Zeros for the few bytes around a piece that share a granule with it (less than two granules).
_ZEROS = bytes(2 * ZERO_GRANULE)


def _write(fd: int, piece: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(piece):
        try:
            done += os.pwrite(fd, piece[done:], offset + done)
        except OSError as exc:  # e.g. ENOSPC
            raise VhdxError(f"write failed: {exc.strerror}", path=path, offset=offset + done) from None


def _in_order(image: VhdxImage, progress):
    """The whole virtual disk, zeros included, as (offset, view) pieces in order (for outputs that cannot seek)."""
    view = memoryview(bytearray(COPY_CHUNK))
    pos = 0
    while pos < image.virtual_size:
        n = min(COPY_CHUNK, image.virtual_size - pos)
        image.readinto(pos, view[:n])
        yield pos, view[:n]
        pos += n
        if progress:
            progress(pos)


def _stream(image: VhdxImage, fd: int, destination: output.Destination, progress, sync: bool) -> int:
    """Write every byte of the virtual disk in order (devices and FIFOs); returns the bytes written."""
    if destination.kind == output.BLOCK_DEVICE:
        room = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
        if room < image.virtual_size:
            raise InvalidRequestError(f"{destination.path} holds {room} bytes, the virtual disk {image.virtual_size}")
    for pos, piece in _in_order(image, progress):
        done = 0
        while done < len(piece):
            try:
                done += os.write(fd, piece[done:])
            except OSError as exc:
                raise VhdxError(f"write failed: {exc.strerror}", path=destination.path, offset=pos + done) from None
    # A staged file is made durable before it takes its name, as the sparse copy does; of the in-place outputs
    # only a block device can be flushed (a FIFO or character device refuses fsync).
    if sync and (not destination.in_place or destination.kind == output.BLOCK_DEVICE):
        _fsync(fd, destination.path)
    return image.virtual_size


def _fsync(fd: int, path: str) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise VhdxError(f"flush failed: {exc.strerror}", path=path) from None


def stream_raw(image: VhdxImage, out, *, progress: Callable[[int], None] | None = None) -> int:
    """Write the whole virtual disk, zeros included, to the binary stream OUT (a pipe: no holes, no seeking).

    Returns the bytes written (the virtual size).
    """
    for _pos, piece in _in_order(image, progress):
        out.write(piece)
    out.flush()
    return image.virtual_size
