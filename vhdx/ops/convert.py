"""Making new standalone VHDX files from other data: a raw image, or a whole chain (flatten).

Only runs that hold data are read; blocks that are all zeros are left unallocated in a dynamic target
(fixed targets read zeros there already). The target is built as an exclusive temporary and renamed at the end
(see ``vhdx.ops.output``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np

from vhdx.disk.image import VhdxImage, open_image
from vhdx.disk.supply import gather_spans
from vhdx.errors import InvalidRequestError, VhdxError
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.ops import output
from vhdx.ops.create import DEFAULT_CREATOR, CreateIds, disk_parameters, write_new_file

COPY_BLOCK = 8 * 1024 * 1024


def raw_data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the parts of a file that may hold data, skipping holes (SEEK_DATA/SEEK_HOLE)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return  # ENXIO: only a hole remains
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        pos = end


def _fill(target: VhdxImage, ranges: Iterator[tuple[int, int]], readinto: Callable[[int, memoryview], None],
          progress: Callable[[int], None] | None) -> int:
    """Copy ranges into ``target``, leaving blocks that are all zero unallocated; returns the bytes written."""
    bs = target.block_size
    step = max(COPY_BLOCK // bs, 1) * bs
    buf = bytearray(step)
    view = memoryview(buf)
    written = 0
    for start, length in ranges:
        pos, end = start, start + length
        while pos < end:
            n = min(end - pos, step - pos % step)
            readinto(pos, view[:n])
            data = np.frombuffer(view[:n], dtype=np.uint8)
            # Cut at block boundaries and find which pieces hold a non-zero byte, all at once.
            cuts = np.unique(np.concatenate(([0], np.arange(-(-pos // bs) * bs, pos + n, bs) - pos)))
            nonzero = np.maximum.reduceat(data, cuts) > 0
            ends = np.append(cuts[1:], n)
            for lo, hi in _true_runs(nonzero, cuts, ends):
                target.write(pos + lo, view[lo:hi])
                written += hi - lo
            pos += n
            if progress:
                progress(pos)
    return written


def _true_runs(mask: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive True pieces."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    first, last = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    return list(zip(starts[first].tolist(), ends[last].tolist(), strict=True))


def _build(destination: output.Destination, params, fill, sync: bool = False, locator=None) -> int:
    """Make a new disk with ``params`` in a temporary, ``fill`` it, and give it the destination's name.

    A differencing disk (``locator``) finds its parent from the destination's folder, where it will live.
    """
    with output.staged(destination) as (_tmp, fd):
        write_new_file(fd, destination.target, params, locator, CreateIds(), DEFAULT_CREATOR, c.DEFAULT_LOG_SIZE)
        # Opened through the descriptor we created, never by name again (the name could be swapped meanwhile);
        # errors name the destination, not the temporary the user never saw.
        with open_image(ImageIO(fd, None, path=destination.target, writable=True, owns=False)) as target:
            # The temporary is thrown away if anything fails: no need to order writes with fsyncs.
            target.io.durable = False
            written = fill(target)
            target.io.durable = sync
            target.flush()
    return written


def import_raw(source, destination, *, type: str = "dynamic", block_size: int | None = None,
               logical_sector_size: int = 512, physical_sector_size: int | None = None, overwrite: bool = False,
               progress: Callable[[int], None] | None = None, sync: bool = False) -> int:
    """Make a VHDX from a raw image (its size must be a multiple of the sector size); returns data bytes."""
    source, destination = os.fspath(source), os.fspath(destination)
    try:
        fd = os.open(source, os.O_RDONLY)
    except OSError as exc:
        raise VhdxError(f"cannot open: {exc.strerror}", path=source) from None
    try:
        st = os.fstat(fd)
        size = st.st_size

        def readinto(offset, view):
            got = os.preadv(fd, [view], offset)
            if got < len(view):
                view[got:] = bytes(len(view) - got)

        if type not in ("dynamic", "fixed"):
            raise InvalidRequestError("a raw image converts to a dynamic or fixed disk")
        params = disk_parameters(size, type, block_size, logical_sector_size, physical_sector_size)
        target = output.resolve(destination, overwrite=overwrite, sources=[(st.st_dev, st.st_ino)])
        return _build(target, params, lambda image: _fill(image, raw_data_ranges(fd, size), readinto, progress),
                      sync)
    finally:
        os.close(fd)


def flatten(image: VhdxImage, destination, *, type: str = "dynamic", block_size: int | None = None,
            overwrite: bool = False, progress: Callable[[int], None] | None = None, sync: bool = False,
            keep_id: bool = False) -> int:
    """Write the whole chain seen through ``image`` as a new standalone disk; the chain is not touched.

    ``keep_id`` gives the new disk the source's Virtual Disk ID (Convert-VHD keeps it; by default a new one).
    """
    if type not in ("dynamic", "fixed"):
        raise InvalidRequestError("flatten makes a dynamic or fixed disk")
    params = disk_parameters(image.virtual_size, type, block_size or image.block_size, image.logical_sector_size,
                             image.physical_sector_size, image.disk_id if keep_id else None)
    target = output.resolve(destination, overwrite=overwrite, sources=output.chain_identities(image))

    def ranges():
        # Data runs that touch (a fragmented chain's 4 KiB pieces from different layers) are read as one range.
        for start, length, _pieces in gather_spans(image.extents().rows(), COPY_BLOCK):
            yield start, length

    return _build(target, params, lambda new: _fill(new, ranges(), image.readinto, progress), sync)
