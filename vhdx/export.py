"""Flatten a virtual disk (its whole chain) into a raw image.

Only runs that hold data are copied (``copy_file_range`` where possible); runs that read as zeros are left
as holes in a sparse output file, so a 10 GiB disk with 20 MiB of data costs 20 MiB of I/O.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from vhdx.errors import InvalidRequestError, VhdxError
from vhdx.extents import ExtentKind
from vhdx.image import VhdxImage
from vhdx.io import COPY_CHUNK, copy_range


def export_raw(image: VhdxImage, out_path: str | os.PathLike, *, overwrite: bool = False,
               progress: Callable[[int], None] | None = None, sync: bool = False) -> int:
    """Write the virtual disk to ``out_path`` as a raw image; returns the bytes of data copied.

    The file is written as ``<out_path>.part`` and renamed at the end, so an interrupted export never leaves
    a complete-looking but partial image behind. ``sync`` makes it durable (fsync) before the rename; like
    cp and qemu-img, the default leaves write-back to the OS.
    """
    out_path = os.fspath(out_path)
    if os.path.exists(out_path) and not overwrite:
        raise InvalidRequestError(f"{out_path} exists (use --force to overwrite)")
    if os.path.exists(out_path) and os.path.isdir(out_path):
        raise InvalidRequestError(f"{out_path} is a directory")
    tmp = out_path + ".part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    copied = 0
    try:
        os.ftruncate(fd, image.virtual_size)
        layers = image.layers
        buf = bytearray(COPY_CHUNK)
        for start, length, kind, layer, file_offset in image.extents().rows():
            if kind == ExtentKind.DATA:
                copy_range(layers[layer].io, file_offset, fd, start, length, buf)
                copied += length
            if progress:
                progress(start + length)
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, out_path)
    except OSError as exc:
        os.unlink(tmp)
        raise VhdxError(f"cannot create {out_path}: {exc.strerror}") from None
    return copied


def stream_raw(image: VhdxImage, out, *, progress: Callable[[int], None] | None = None) -> int:
    """Write the whole virtual disk, zeros included, to the binary stream OUT (a pipe: no holes, no seeking).

    Returns the bytes written (the virtual size).
    """
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    offset = 0
    while offset < image.virtual_size:
        n = image.readinto(offset, view[: min(COPY_CHUNK, image.virtual_size - offset)])
        out.write(view[:n])
        offset += n
        if progress:
            progress(offset)
    out.flush()
    return offset
