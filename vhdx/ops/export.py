"""Flatten a virtual disk (its whole chain) into a raw image.

Only runs that hold data are read; runs that read as zeros (blocks not present, ZERO or trimmed) are left as holes
in a sparse output file, so a 10 GiB disk with 20 MiB of data costs 20 MiB of I/O. Inside the data, whole 4 KiB
granules of zeros (:func:`vhdx.disk.zero_runs.nonzero_runs`, numpy over 8 MiB reads) are left as holes too, as
``qemu-img convert`` does. ``sparse=False`` (``--no-sparse``) writes every byte: a fully allocated file. A device or
FIFO is written in place, every byte in order (it is not known to read zeros where nothing is written), never
punched.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from vhdx.disk.image import VhdxImage
from vhdx.disk.supply import gather_spans
from vhdx.disk.zero_runs import nonzero_runs
from vhdx.errors import InvalidRequestError, VhdxError
from vhdx.io import COPY_CHUNK
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
    written = 0
    try:
        os.ftruncate(fd, image.virtual_size)
    except OSError as exc:
        raise VhdxError(f"cannot resize file: {exc.strerror}", path=path) from None
    layers = image.layers
    view = memoryview(bytearray(COPY_CHUNK))
    # Neighbouring small runs (a fragmented chain: 4 KiB here, 4 KiB from a parent there) are gathered into one
    # buffer; each buffer is written without its whole zero granules, which stay holes.
    for start, length, pieces in gather_spans(image.extents().rows(), COPY_CHUNK):
        held = 0
        for _vstart, n, layer, file_offset in pieces:
            layers[layer].io.readinto_at(file_offset, view[held : held + n])
            held += n
        for run, size in nonzero_runs(view[:held], start):
            _write(fd, view[run : run + size], start + run, path)
            written += size
        if progress:
            progress(start + length)
    if progress:
        progress(image.virtual_size)
    if sync:
        _fsync(fd, path)
    return written


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
