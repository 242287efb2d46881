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
import os
from collections.abc import Callable

import numpy as np

from vhdx.disk.extents import ExtentKind
from vhdx.disk.image import VhdxImage
from vhdx.disk.zero_runs import ZERO_GRANULE, nonzero_granule_runs
from vhdx.errors import InvalidRequestError, VhdxError
from vhdx.io import COPY_CHUNK, ImageIO, WriteBehind
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
    readers = [_Reader(layer.io) for layer in image.layers]
    ext = image.extents()
    data = ext.kind == ExtentKind.DATA
    start, length, layer, file_offset = ext.start[data], ext.length[data], ext.layer[data], ext.file_offset[data]
    cover = _cover_ends(start, start + length, layer, file_offset)
    with WriteBehind(fd) if sync else contextlib.nullcontext() as behind:
        out = _SparseOutput(fd, path, image.virtual_size, progress, behind)
        for row in zip(start.tolist(), length.tolist(), layer.tolist(), file_offset.tolist(), cover.tolist(),
                       strict=True):
            out.add(row[0], row[1], readers[row[2]], row[3], row[4])
        out.flush()
    if progress:
        progress(image.virtual_size)
    if sync:
        _fsync(fd, path)
    return out.written


# Longest stretch between two runs of the deepest layer that one read of its file may fetch and throw away.
COVER_GAP = 64 << 10


def _cover_ends(start: np.ndarray, end: np.ndarray, layer: np.ndarray, file_offset: np.ndarray) -> np.ndarray:
    """How far one read for each data run may go (a virtual end; the run's own end unless it can do better).

    A fragmented chain splits the base's data into many runs around the children's small writes. The runs of the
    deepest layer that continue one stretch of its file (same file offset minus virtual offset) with gaps of at
    most ``COVER_GAP`` between them are fetched by one read from the first: every run in a gap comes from a
    shallower layer or reads as zeros, and is filled after it, over the bytes read there. Runs of a gap that
    starts a new segment of the buffer (see ``_SparseOutput``) end the stretch.
    """
    cover = end.copy()
    if len(start) < 2:
        return cover
    g = ZERO_GRANULE
    segment = np.concatenate(([0], np.cumsum(start[1:] // g > -(-end[:-1] // g))))
    rows = np.flatnonzero(layer == layer.max())
    if len(rows) < 2:
        return cover
    a, b = rows[:-1], rows[1:]
    joined = ((file_offset[b] - start[b] == file_offset[a] - start[a]) & (start[b] - end[a] <= COVER_GAP)
              & (segment[a] == segment[b]))
    first = np.flatnonzero(np.concatenate(([True], ~joined)))
    last = np.append(first[1:], len(rows)) - 1
    # Every run of a stretch may read to its end: the one after a full buffer starts the read afresh.
    cover[rows] = np.repeat(end[rows[last]], np.diff(np.append(first, len(rows))))
    return cover


class _Reader:
    """Positional reads of one layer: straight ``preadv`` where the file has the bytes as they are on disk."""

    __slots__ = ("fd", "io", "size")

    def __init__(self, io: ImageIO) -> None:
        self.io = io
        self.fd = io.fd if io.overlay is None else None  # an in-memory log replay patches what is read
        self.size = io.real_size if self.fd is not None else 0

    def readinto(self, offset: int, view: memoryview) -> None:
        if offset + len(view) <= self.size:
            try:
                if os.preadv(self.fd, [view], offset) == len(view):
                    return
            except OSError:
                pass  # readinto_at reads again and reports the error with the file and offset
        self.io.readinto_at(offset, view)  # short reads, past the end of the file, overlays


# Zeros for the few bytes around a piece that share a granule with it (less than two granules).
_ZEROS = bytes(2 * ZERO_GRANULE)


class _SparseOutput:
    """Packs the data runs of a disk into one buffer and writes its non-zero granules where they belong.

    The buffer holds segments: stretches of whole granules of the disk, each filled from the runs that meet it
    (zeros where no run does, as the disk reads there). One numpy pass finds the granules holding data, and each
    run of them is one ``pwrite``; whole zero granules stay holes of the output.
    """

    def __init__(self, fd: int, path: str, virtual_size: int, progress, behind: WriteBehind | None) -> None:
        self.fd, self.path, self.virtual_size = fd, path, virtual_size
        self.progress, self.behind = progress, behind
        self.view = memoryview(bytearray(COPY_CHUNK))
        self.seg_buffer: list[int] = []  # granule-aligned buffer offset of each segment
        self.seg_virtual: list[int] = []  # the virtual offset that buffer offset holds
        self.pos = 0  # end of the bytes filled in the buffer
        self.virtual_end = -1  # virtual offset of buffer[pos] (the current segment's end); -1: no segment
        self.written = 0
        self.cover_reader: _Reader | None = None  # what the last read past its own run fetched (see add)
        self.cover_shift = self.cover_end = 0

    def add(self, start: int, length: int, reader: _Reader, file_offset: int, cover_end: int) -> None:
        """Copy ``length`` bytes of the disk from ``start``, held by ``reader`` at ``file_offset``.

        Reading may go on to ``cover_end`` (see ``_cover_ends``); a later run inside what was read then costs none.
        """
        g = ZERO_GRANULE
        cap = len(self.view)
        while length:
            # A run that starts in the granule where the segment ends, or the next, continues the segment.
            joins = self.virtual_end >= 0 and start // g <= -(-self.virtual_end // g)
            at = self.pos + start - self.virtual_end if joins else -(-self.pos // g) * g + start % g
            if at >= cap:
                self.flush()
                continue
            if not joins:
                self.seg_buffer.append(at - start % g)
                self.seg_virtual.append(start - start % g)
            self.view[self.pos : at] = _ZEROS[: at - self.pos]
            n = min(length, cap - at)
            if reader is self.cover_reader and file_offset - start == self.cover_shift and start + n <= self.cover_end:
                pass  # read with an earlier run of its layer, and nothing was filled over it since
            elif n == length and cover_end > start + n:
                k = min(cover_end - start, cap - at)
                reader.readinto(file_offset, self.view[at : at + k])
                self.cover_reader, self.cover_shift, self.cover_end = reader, file_offset - start, start + k
            else:
                reader.readinto(file_offset, self.view[at : at + n])
            self.pos, self.virtual_end = at + n, start + n
            start, length, file_offset = start + n, length - n, file_offset + n

    def flush(self) -> None:
        """Write the non-zero granules of the buffer and empty it."""
        if not self.seg_buffer:
            return
        end = -(-self.pos // ZERO_GRANULE) * ZERO_GRANULE
        self.view[self.pos : end] = _ZEROS[: end - self.pos]
        seg_buffer = np.array(self.seg_buffer, dtype=np.int64)
        starts, ends = nonzero_granule_runs(self.view[:end], seg_buffer)
        seg = seg_buffer.searchsorted(starts, "right") - 1
        shift = np.array(self.seg_virtual, dtype=np.int64)[seg] - seg_buffer[seg]
        for lo, hi, to in zip(starts.tolist(), ends.tolist(), shift.tolist(), strict=True):
            hi = min(hi, self.virtual_size - to)  # the last granule of a disk may end past it
            _write(self.fd, self.view[lo:hi], lo + to, self.path)
            self.written += hi - lo
        last = self.virtual_end
        self.seg_buffer, self.seg_virtual = [], []
        self.pos, self.virtual_end = 0, -1
        self.cover_reader = None
        if self.behind is not None:
            self.behind.advance(last)
        if self.progress:
            self.progress(last)


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
    if sync and destination.kind == output.BLOCK_DEVICE:
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
