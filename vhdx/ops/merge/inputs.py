"""Reading a merge's plan inputs from opened images: BAT arrays, sector bitmaps and free space of each file."""

from __future__ import annotations

import numpy as np

from vhdx.disk.image import VhdxImage
from vhdx.disk.writer import end_of_structures
from vhdx.format import constants as c
from vhdx.ops.merge.plan import BS, SECTOR_BATCH, DestArrays, LayerArrays, reusable_blocks


def read_layer_arrays(image: VhdxImage) -> LayerArrays:
    """A file's BAT arrays and the packed sector bits of its partially present blocks (one read per chunk)."""
    bat = image.bat
    states = bat.states.copy()
    partial = np.flatnonzero(states == BS.PARTIALLY_PRESENT).astype(np.int64)
    per = image.geometry.bitmap_bytes_per_block
    packed = np.zeros((len(partial), per), np.uint8)
    step = max(1, SECTOR_BATCH // max(per * 8, 1))
    for lo in range(0, len(partial), step):
        bits = image.read_bitmap_bits(partial[lo : lo + step])
        packed[lo : lo + step] = np.packbits(bits, axis=1, bitorder="little")
    return LayerArrays(image.virtual_size, image.block_size, image.logical_sector_size, states,
                       bat.offsets.copy(), partial, packed)


def dest_kind_of(image: VhdxImage) -> str:
    if image.has_parent:
        return "differencing"
    return "fixed" if image.params.leave_block_allocated else "dynamic"


def read_dest_arrays(image: VhdxImage) -> DestArrays:
    layer = read_layer_arrays(image)
    bat = image.bat
    present = bat.allocated_blocks()
    sb = bat.bitmap_states == c.SbState.PRESENT
    header = image.headers.current
    regions = [(0, c.HEADER_SECTION_SIZE), (header.log_offset, header.log_offset + header.log_length),
               (image.regions.bat.file_offset, image.regions.bat.end),
               (image.regions.metadata.file_offset, image.regions.metadata.end)]
    held = [(bat.offsets[present], bat.offsets[present] + image.block_size),
            (bat.bitmap_offsets[sb], bat.bitmap_offsets[sb] + c.SECTOR_BITMAP_BLOCK_SIZE),
            (np.array([r[0] for r in regions], np.int64), np.array([r[1] for r in regions], np.int64))]
    size = image.io.real_size
    reusable = reusable_blocks(bat.states, bat.offsets, image.block_size, size, held)
    return DestArrays(layer, dest_kind_of(image), sb.copy() if image.has_parent else np.zeros(len(sb), bool),
                      bat.bitmap_offsets.copy(), reusable, end_of_structures(image), size)
