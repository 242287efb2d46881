"""BAT geometry: the numpy Geometry/split_entries agree with a scalar transcription of the spec formulas.

The scalar reference below is written straight from [MS-VHDX] §2.4/§2.5 (VHDX-FORMAT.md §5.3), one plain
integer function per formula, so the vectorised code has something independent to be compared with.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from vhdx.format import constants as c
from vhdx.structures.bat import BAT_DTYPE, Geometry, split_entries

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


# --- scalar reference -------------------------------------------------------------------------------

def ref_chunk_ratio(block_size: int, sector_size: int) -> int:
    return (2**23 * sector_size) // block_size


def ref_data_blocks(virtual_size: int, block_size: int) -> int:
    return (virtual_size + block_size - 1) // block_size


def ref_bitmap_blocks(virtual_size: int, block_size: int, sector_size: int) -> int:
    ratio = ref_chunk_ratio(block_size, sector_size)
    return (ref_data_blocks(virtual_size, block_size) + ratio - 1) // ratio


def ref_bat_entries(virtual_size: int, block_size: int, sector_size: int, has_parent: bool) -> int:
    ratio = ref_chunk_ratio(block_size, sector_size)
    if has_parent:
        return ref_bitmap_blocks(virtual_size, block_size, sector_size) * (ratio + 1)
    blocks = ref_data_blocks(virtual_size, block_size)
    return blocks + (blocks - 1) // ratio


def ref_payload_index(block: int, ratio: int) -> int:
    return block + block // ratio


def ref_bitmap_index(chunk: int, ratio: int) -> int:
    return chunk * (ratio + 1) + ratio


# --- strategies -------------------------------------------------------------------------------------

block_sizes = st.sampled_from([MiB << k for k in range(9)])  # 1 MiB .. 256 MiB, powers of two
sector_sizes = st.sampled_from([512, 4096])


@st.composite
def geometries(draw, max_size: int = c.MAX_VIRTUAL_SIZE):
    sector = draw(sector_sizes)
    virtual_size = draw(st.integers(min_value=1, max_value=max_size // sector)) * sector
    return Geometry(virtual_size, draw(block_sizes), sector, draw(st.booleans()))


# --- properties -------------------------------------------------------------------------------------

@given(geometries())
def test_geometry_counts_match_spec_formulas(g):
    ratio = ref_chunk_ratio(g.block_size, g.logical_sector_size)
    assert g.chunk_ratio == ratio
    assert g.chunk_size == 2**23 * g.logical_sector_size
    assert g.data_blocks == ref_data_blocks(g.virtual_size, g.block_size)
    assert g.sector_bitmap_blocks == ref_bitmap_blocks(g.virtual_size, g.block_size, g.logical_sector_size)
    assert g.bat_entries == ref_bat_entries(g.virtual_size, g.block_size, g.logical_sector_size, g.has_parent)
    assert g.bitmap_bytes_per_block == g.block_size // g.logical_sector_size // 8


@given(geometries())
def test_geometry_chunk_ratio_is_power_of_two_in_spec_range(g):
    assert 16 <= g.chunk_ratio <= 32768
    assert g.chunk_ratio & (g.chunk_ratio - 1) == 0


@given(geometries(), st.data())
def test_geometry_indexes_match_spec_formulas_scalar_and_array(g, data):
    ratio = g.chunk_ratio
    last = g.data_blocks - 1
    picks = {0, last, min(last, ratio - 1), min(last, ratio), data.draw(st.integers(0, last))}
    blocks = np.array(sorted(picks), dtype=np.int64)
    chunks = blocks // ratio
    expected_payload = [ref_payload_index(int(b), ratio) for b in blocks]
    expected_bitmap = [ref_bitmap_index(int(k), ratio) for k in chunks]
    assert [g.payload_index(int(b)) for b in blocks] == expected_payload
    assert g.payload_index(blocks).tolist() == expected_payload
    assert g.bitmap_index(chunks).tolist() == expected_bitmap
    # Every payload entry the disk needs lies inside the BAT; so does every bitmap entry of a differencing disk.
    assert max(expected_payload) < g.bat_entries
    if g.has_parent:
        assert max(expected_bitmap) < g.bat_entries


@given(geometries(max_size=256 * GiB), st.data())
def test_geometry_split_entries_picks_spec_indexes(g, data):
    # Entry i holds i in its FileOffsetMB field, so each split value names the BAT index it came from.
    raw = (np.arange(g.bat_entries, dtype=BAT_DTYPE) << np.uint64(20)) | np.uint64(6)
    payload, bitmap = split_entries(raw, g)
    assert len(payload) == g.data_blocks
    assert len(bitmap) == g.sector_bitmap_blocks
    ratio = g.chunk_ratio
    last = g.data_blocks - 1
    for b in {0, last, min(last, ratio), data.draw(st.integers(0, last))}:
        assert int(payload[b]) >> 20 == ref_payload_index(b, ratio)
    for k in {0, g.sector_bitmap_blocks - 1, data.draw(st.integers(0, g.sector_bitmap_blocks - 1))}:
        index = ref_bitmap_index(k, ratio)
        # A non-differencing BAT ends at the last payload entry: a bitmap slot past it reads as not present.
        assert int(bitmap[k]) == (((index << 20) | 6) if index < g.bat_entries else 0)


# --- worked examples (VHDX-FORMAT.md §5.3) ----------------------------------------------------------

def test_geometry_example_a_512_sectors_8mib_blocks_10gib():
    dyn = Geometry(10 * GiB, 8 * MiB, 512, False)
    diff = Geometry(10 * GiB, 8 * MiB, 512, True)
    assert dyn.chunk_ratio == 512
    assert dyn.chunk_size == 4 * GiB
    assert dyn.data_blocks == 1280
    assert dyn.sector_bitmap_blocks == 3
    assert dyn.bat_entries == 1282
    assert diff.bat_entries == 1539
    assert dyn.payload_index(600) == 601
    assert dyn.bitmap_index(600 // dyn.chunk_ratio) == 1025


def test_geometry_example_a_byte_offset_to_bitmap_bit():
    g = Geometry(10 * GiB, 8 * MiB, 512, True)
    offset = 5_000_000_000
    block, in_block = divmod(offset, g.block_size)
    assert (block, in_block) == (596, 389_632)
    sector = in_block // g.logical_sector_size
    assert sector == 761
    assert g.sectors_per_block == 16_384
    assert g.payload_index(block) == 597
    chunk = block // g.chunk_ratio
    assert (chunk, g.bitmap_index(chunk)) == (1, 1025)
    sector_in_chunk = (block % g.chunk_ratio) * g.sectors_per_block + sector
    assert sector_in_chunk == 1_377_017 == offset // 512 - 2**23
    # The bitmap byte as the reader addresses it: this block's slice of the chunk, then the sector's byte.
    byte = (block % g.chunk_ratio) * g.bitmap_bytes_per_block + sector // 8
    assert (byte, sector % 8) == (172_127, 1)


def test_geometry_example_b_4096_sectors_32mib_blocks_100gib():
    dyn = Geometry(100 * GiB, 32 * MiB, 4096, False)
    diff = Geometry(100 * GiB, 32 * MiB, 4096, True)
    assert dyn.chunk_ratio == 1024
    assert dyn.chunk_size == 32 * GiB
    assert dyn.sectors_per_block == 8192
    assert (dyn.data_blocks, dyn.sector_bitmap_blocks) == (3200, 4)
    assert (dyn.bat_entries, diff.bat_entries) == (3203, 4100)
    assert dyn.payload_index(2048) == 2050
    assert dyn.bitmap_index(2) == 3074


def test_geometry_example_c_hyperv_default_127gib():
    dyn = Geometry(127 * GiB, 32 * MiB, 512, False)
    diff = Geometry(127 * GiB, 32 * MiB, 512, True)
    assert dyn.chunk_ratio == 128
    assert (dyn.data_blocks, dyn.sector_bitmap_blocks) == (4064, 32)
    assert (dyn.bat_entries, diff.bat_entries) == (4095, 4128)


def test_geometry_extreme_64tib_1mib_blocks():
    g = Geometry(64 * TiB, 1 * MiB, 512, False)
    assert g.data_blocks == 67_108_864
    assert g.chunk_ratio == 4096
    assert g.bat_entries == 67_125_247
