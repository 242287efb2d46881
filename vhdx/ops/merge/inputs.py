"""Reading a merge's plan inputs from opened images: BAT columns, sector bitmaps and free space of each file.

The per-block columns are views over the windowed BAT (``BatColumn``): planning reads the blocks of one window
at a time, so a 64 TiB chain is planned in bounded memory; only what is sparse (partially present blocks and
their bits, reusable blocks) is gathered up front, in one pass over the windows that hold data.
"""

from __future__ import annotations

import numpy as np

from vhdx.disk.image import VhdxImage
from vhdx.disk.writer import end_of_structures
from vhdx.format import constants as c
from vhdx.ops.merge.plan import BS, SECTOR_BATCH, DestArrays, LayerArrays, reusable_blocks
from vhdx.structures.bat import Bat, allocated_mask, entry_offsets, entry_states, kept_space_mask


class BatColumn:
    """Payload states (``which="states"``) or offsets of a BAT, indexed like an array by block numbers.

    Indexing reads the window range the blocks span (planning asks for one window of blocks at a time).
    """

    def __init__(self, bat: Bat, which: str) -> None:
        self._bat = bat
        self._which = 0 if which == "states" else 1

    def __len__(self) -> int:
        return self._bat.geometry.data_blocks

    def __getitem__(self, blocks) -> np.ndarray:
        blocks = np.asarray(blocks, dtype=np.int64)
        if not blocks.size:
            return np.zeros(blocks.shape, np.uint8 if self._which == 0 else np.int64)
        lo, hi = int(blocks.min()), int(blocks.max()) + 1
        return self._bat.payload_range(lo, hi)[self._which][blocks - lo]

    def uniform_state(self, b0: int, b1: int) -> int | None:
        return self._bat.uniform_state(b0, b1)


class BlockSet:
    """A set of block numbers that answers ``view[blocks]`` with a bool array, like a mask over every block."""

    def __init__(self, blocks: np.ndarray, length: int) -> None:
        self._blocks = np.asarray(blocks, dtype=np.int64)
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, blocks) -> np.ndarray:
        return np.isin(np.asarray(blocks, dtype=np.int64), self._blocks)


def read_layer_arrays(image: VhdxImage) -> LayerArrays:
    """A file's BAT columns and the packed sector bits of its partially present blocks (one read per chunk)."""
    bat = image.bat
    found = [np.flatnonzero(entry_states(w.payload) == BS.PARTIALLY_PRESENT) + w.b0 for w in bat.raw_windows()
             if w.uniform is None or w.uniform & c.BAT_STATE_MASK == BS.PARTIALLY_PRESENT]
    partial = np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)
    per = image.geometry.bitmap_bytes_per_block
    packed = np.zeros((len(partial), per), np.uint8)
    step = max(1, SECTOR_BATCH // max(per * 8, 1))
    for lo in range(0, len(partial), step):
        bits = image.read_bitmap_bits(partial[lo : lo + step])
        packed[lo : lo + step] = np.packbits(bits, axis=1, bitorder="little")
    return LayerArrays(image.virtual_size, image.block_size, image.logical_sector_size,
                       BatColumn(bat, "states"), BatColumn(bat, "offsets"), partial, packed)


def dest_kind_of(image: VhdxImage) -> str:
    if image.has_parent:
        return "differencing"
    return "fixed" if image.params.leave_block_allocated else "dynamic"


def _reusable(image: VhdxImage) -> np.ndarray:
    """Blocks whose ZERO/UNMAPPED/UNDEFINED entry kept space nothing else overlaps (sorted block numbers).

    The candidates come from one pass over the windows; only when there are any is a second pass made to
    gather what else holds file space (present blocks and sector bitmaps).
    """
    bat = image.bat
    cand_blocks, cand_offsets = [], []
    for w in bat.raw_windows():
        states, offsets = entry_states(w.payload), entry_offsets(w.payload)
        sel = np.flatnonzero(kept_space_mask(states, offsets))
        cand_blocks.append(sel + w.b0)
        cand_offsets.append(offsets[sel])
    blocks = np.concatenate(cand_blocks).astype(np.int64) if cand_blocks else np.zeros(0, np.int64)
    if not len(blocks):
        return blocks
    offsets = np.concatenate(cand_offsets).astype(np.int64)
    present, bitmaps = [], []
    for w in bat.raw_windows():
        states, off = entry_states(w.payload), entry_offsets(w.payload)
        present.append(off[allocated_mask(states)])
        bitmaps.append(w.present_bitmap_offsets())
    present_off = np.concatenate(present).astype(np.int64)
    sb_off = np.concatenate(bitmaps).astype(np.int64)
    header = image.headers.current
    regions = [(0, c.HEADER_SECTION_SIZE), (header.log_offset, header.log_offset + header.log_length),
               (image.regions.bat.file_offset, image.regions.bat.end),
               (image.regions.metadata.file_offset, image.regions.metadata.end)]
    held = [(present_off, present_off + image.block_size), (sb_off, sb_off + c.SECTOR_BITMAP_BLOCK_SIZE),
            (np.array([r[0] for r in regions], np.int64), np.array([r[1] for r in regions], np.int64))]
    states = np.full(len(blocks), BS.ZERO, np.uint8)  # every candidate reads as zeros (its state is not needed)
    return blocks[reusable_blocks(states, offsets, image.block_size, image.io.real_size, held)]


def read_dest_arrays(image: VhdxImage) -> DestArrays:
    layer = read_layer_arrays(image)
    bat = image.bat
    sb_states, sb_offsets = bat.bitmap_range(0, image.geometry.sector_bitmap_blocks)
    sb = sb_states == c.SbState.PRESENT
    return DestArrays(layer, dest_kind_of(image), sb.copy() if image.has_parent else np.zeros(len(sb), bool),
                      sb_offsets.copy(), BlockSet(_reusable(image), image.geometry.data_blocks),
                      end_of_structures(image), image.io.real_size)
