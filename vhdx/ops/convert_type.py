"""Convert-VHD to a differencing disk: a new child of a given parent holding only the sectors that differ from it.

The source (any disk or chain) and the parent are compared sector by sector over every range where either of them
holds data (elsewhere both read zeros); sectors that differ are written to the child, which reads the source's bytes
through the parent afterwards. The child is built in a temporary and renamed at the end (as ``flatten``).

References: [MS-VHDX] §2.4 (sector bitmaps of differencing disks), §2.6.2.6 (parent locator).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from vhdx.disk.extents import ExtentKind
from vhdx.disk.image import VhdxImage, open_image
from vhdx.errors import InvalidRequestError
from vhdx.ops import output
from vhdx.ops.convert import _build, _true_runs
from vhdx.ops.create import DIFFERENCING_BLOCK_SIZE, disk_parameters, parent_locator_entries

STEP = 8 * 1024 * 1024


def data_runs(*images: VhdxImage) -> list[tuple[int, int]]:
    """(start, end) of the merged ranges where any of ``images`` (through their chains) holds data."""
    starts, ends = [], []
    for image in images:
        ext = image.extents()
        data = ext.kind == ExtentKind.DATA
        starts.append(ext.start[data])
        ends.append(ext.end[data])
    start, end = np.concatenate(starts), np.concatenate(ends)
    if not len(start):
        return []
    order = np.argsort(start, kind="stable")
    start, end = start[order], np.maximum.accumulate(end[order])
    new_run = np.concatenate(([True], start[1:] > end[:-1]))
    first = np.flatnonzero(new_run)
    last = np.concatenate((first[1:], [len(start)])) - 1
    return list(zip(start[first].tolist(), end[last].tolist(), strict=True))


def differing_sectors(ours: np.ndarray, theirs: np.ndarray, sector: int) -> np.ndarray:
    """Mask of the sectors (rows of ``sector`` bytes) in which the two buffers differ."""
    return (ours.reshape(-1, sector) != theirs.reshape(-1, sector)).any(axis=1)


def make_child(image: VhdxImage, destination, parent, *, block_size: int | None = None, keep_id: bool = False,
               overwrite: bool = False, progress: Callable[[int], None] | None = None, sync: bool = False) -> int:
    """Write ``image``'s virtual disk as a new child of ``parent`` holding only what differs; returns bytes written.

    ``keep_id`` gives the child the source's Virtual Disk ID (otherwise it takes the parent's, as Hyper-V does).
    """
    destination, parent = os.fspath(destination), os.fspath(parent)
    with open_image(parent) as base:
        if base.logical_sector_size != image.logical_sector_size:
            raise InvalidRequestError(f"the parent has {base.logical_sector_size}-byte sectors, the source "
                                      f"{image.logical_sector_size}-byte ones: a child must match its parent")
        if base.virtual_size > image.virtual_size:
            raise InvalidRequestError(f"the parent ({base.virtual_size} bytes) is larger than the source "
                                      f"({image.virtual_size}); a child cannot be smaller than its parent")
        # Neither a layer of the source nor the new parent's chain may be replaced by the child (same inode).
        target = output.resolve(destination, overwrite=overwrite,
                                sources=[*output.chain_identities(image), *output.chain_identities(base)])
        params = disk_parameters(image.virtual_size, "differencing", block_size or DIFFERENCING_BLOCK_SIZE,
                                 base.logical_sector_size, base.physical_sector_size,
                                 image.disk_id if keep_id else base.disk_id)
        locator = parent_locator_entries(target.target, parent, base.data_write_guid)

    def fill(target: VhdxImage) -> int:
        base = target.parent
        lss = image.logical_sector_size
        ours, theirs = bytearray(STEP), bytearray(STEP)
        written = 0
        for start, end in data_runs(image, base):
            for pos in range(start, end, STEP):
                n = min(STEP, end - pos)
                image.readinto(pos, memoryview(ours)[:n])
                theirs_view = memoryview(theirs)[:n]
                got = base.readinto(pos, theirs_view) if pos < base.virtual_size else 0
                theirs_view[got:] = bytes(n - got)  # past the parent's end the child alone supplies bytes
                mask = differing_sectors(np.frombuffer(ours, np.uint8)[:n], np.frombuffer(theirs, np.uint8)[:n],
                                         lss)
                cuts = np.arange(len(mask)) * lss
                for lo, hi in _true_runs(mask, cuts, cuts + lss):
                    target.write(pos + lo, memoryview(ours)[lo:hi])
                    written += hi - lo
                if progress:
                    progress(pos + n)
        return written

    return _build(target, params, fill, sync, locator=locator)
