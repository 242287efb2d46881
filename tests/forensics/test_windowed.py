"""diff and slack read the BAT window by window: bounded memory on 64 TiB chains, same answers as whole arrays.

The property tests shrink the BAT window to one chunk (4 GiB of a 512-byte-sector disk) so a 5-chunk disk
crosses five windows, and compare with references computed here from the whole-BAT arrays.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vhdx
from tests.forensics.helpers import MiB, build_chain, pattern
from tests.test_scale import RSS_LIMIT, run_measured
from vhdx.disk.extents import ExtentKind, bitmap_runs
from vhdx.forensics import diff as diff_module
from vhdx.forensics import slack as slack_module
from vhdx.forensics.diff import held_ranges, merge_ranges
from vhdx.format import constants as c
from vhdx.structures import bat as bat_module
from vhdx_fixtures.scale import build_scale_chain

GiB = 1 << 30
CHUNK = 4 * GiB  # virtual bytes per sector bitmap chunk with 512-byte sectors
ONE_CHUNK_WINDOWS = 4097  # BAT entries of one chunk with 1 MiB blocks: every window holds one chunk


@pytest.fixture(scope="module")
def chain64(tmp_path_factory):
    return build_scale_chain(str(tmp_path_factory.mktemp("chain64")), qemu_base=False)


# --- memory on a 64 TiB chain -------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", [[], ["--blocks"]], ids=["sectors", "blocks"])
def test_diff_of_a_64t_child_stays_under_256_mib(chain64, tmp_path, granularity):
    code, rss, out = run_measured(["diff", *granularity, chain64.top], tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT
    assert "3 extents" in out


def test_slack_of_a_4_layer_64t_chain_stays_under_256_mib(chain64, tmp_path):
    code, rss, out = run_measured(["slack", chain64.top], tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT
    assert out.count("of slack") == 4  # every layer reported


# --- windowed equals whole arrays -------------------------------------------------------------------
@st.composite
def wide_chains(draw):
    """base -> child over 5 chunks plus a partial last block, with writes, zeroed and discarded blocks."""
    size = 5 * CHUNK + draw(st.integers(1, MiB // 512 - 1)) * 512
    layers = []
    for depth in range(2):
        ops = [("write", draw(st.integers(0, size // MiB - 1)) * MiB, pattern(depth, MiB))] if depth == 0 else []
        for n in range(draw(st.integers(1, 6))):
            block = draw(st.integers(0, size // MiB))
            offset = min(block * MiB + draw(st.sampled_from([0, 512, 4096, MiB // 2])), size - 512)
            kind = draw(st.sampled_from(["write", "write", "write", "zero", "discard"]))
            if kind == "write":
                length = min(size - offset, draw(st.sampled_from([512, 3000, MiB, 2 * MiB + 512])))
                ops.append(("write", offset, pattern(depth * 10 + n, length)))
            else:
                start = offset // MiB * MiB
                ops.append((kind, start, min(draw(st.integers(1, 2)) * MiB, size - start)))
        layers.append(ops)
    return size, layers


def whole_held(layer, sectors: bool) -> tuple[np.ndarray, np.ndarray]:
    """The held ranges of one file from its whole BAT arrays (the reference)."""
    g, states = layer.geometry, layer.bat.states
    held = states != c.BatState.NOT_PRESENT
    partial = states == c.BatState.PARTIALLY_PRESENT
    if sectors:
        held &= ~partial
    blocks = np.flatnonzero(held).astype(np.int64)
    starts, ends = [blocks * g.block_size], [np.minimum((blocks + 1) * g.block_size, g.virtual_size)]
    if sectors and partial.any():
        blocks = np.flatnonzero(partial).astype(np.int64)
        runs = bitmap_runs(layer.read_bitmap_bits(blocks), blocks * g.block_size, layer.bat.offsets[blocks],
                           g.logical_sector_size)
        data = runs.kind == ExtentKind.DATA
        starts.append(runs.start[data])
        ends.append(np.minimum(runs.start[data] + runs.length[data], g.virtual_size))
    return np.concatenate(starts), np.concatenate(ends)


@given(wide_chains(), st.booleans())
def test_windowed_diff_ranges_equal_the_whole_bat_reference(chain, sectors):
    size, layers = chain
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_chain(Path(tmp), layers, size=size)
        with mock.patch.object(bat_module, "WINDOW_ENTRIES", ONE_CHUNK_WINDOWS), \
                mock.patch.object(diff_module, "BITMAP_BITS", 3 * 2048), \
                vhdx.open(paths[-1]) as windowed:  # 3 partial blocks per bitmap batch
            assert windowed.bat.window_count == 6
            got = merge_ranges(*held_ranges(windowed, sectors=sectors))[:2]
            assert windowed.bat._entries is None  # never read whole
        with vhdx.open(paths[-1]) as whole:
            expected = merge_ranges(*whole_held(whole, sectors))[:2]
    assert [a.tolist() for a in got] == [a.tolist() for a in expected]


def whole_block_facts(image, size: int):
    """Owned file ranges (merged), stale and partial blocks of one file from its whole BAT arrays."""
    g, bat = image.geometry, image.bat
    allocated = bat.allocated_blocks()
    starts = [bat.offsets[allocated]]
    ends = [bat.offsets[allocated] + g.block_size]
    if g.has_parent:
        present = bat.bitmap_states == c.SbState.PRESENT
        starts.append(bat.bitmap_offsets[present])
        ends.append(bat.bitmap_offsets[present] + c.SECTOR_BITMAP_BLOCK_SIZE)
    owned = merge_ranges(np.concatenate(starts), np.concatenate(ends))[:2]
    stale = np.flatnonzero(~allocated & (bat.offsets >= c.HEADER_SECTION_SIZE) & (bat.offsets < size))
    partial = np.flatnonzero(bat.states == c.BatState.PARTIALLY_PRESENT)
    return owned, (stale, bat.states[stale], bat.offsets[stale]), (partial, bat.offsets[partial])


@given(wide_chains())
def test_windowed_slack_equals_the_whole_bat_reference(chain):
    size, layers = chain
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_chain(Path(tmp), layers, size=size)
        # Stale blocks: one of the base's blocks turned NOT_PRESENT with its file offset kept (when the base kept
        # any block: a write the same layer zeroed again leaves none).
        with vhdx.open(paths[0]) as base:
            written = np.flatnonzero(base.bat.allocated_blocks())
            if len(written):
                entry = base.bat.entry_file_offset(int(base.geometry.payload_index(written[-1])))
                offset = int(base.bat.offsets[written[-1]])
        if len(written):
            with open(paths[0], "r+b") as f:
                f.seek(entry)
                f.write(offset.to_bytes(8, "little"))
        for path in paths:
            file_size = path.stat().st_size
            with mock.patch.object(bat_module, "WINDOW_ENTRIES", ONE_CHUNK_WINDOWS), \
                    mock.patch.object(slack_module, "BITMAP_BITS", 3 * 2048), \
                    vhdx.open(path, orphan=True) as windowed:
                facts = slack_module._block_facts(windowed, file_size)
                areas = slack_module.find_slack_areas(windowed)
                assert windowed.bat._entries is None
            with vhdx.open(path, orphan=True) as whole:
                owned, stale, partial = whole_block_facts(whole, file_size)
                whole_areas = slack_module.find_slack_areas(whole)  # one window holds this whole BAT
            assert [a.tolist() for a in merge_ranges(facts.owned_starts, facts.owned_ends)[:2]] == \
                [a.tolist() for a in owned]
            assert [a.tolist() for a in (facts.stale_blocks, facts.stale_states, facts.stale_offsets)] == \
                [a.tolist() for a in stale]
            assert [a.tolist() for a in (facts.partial_blocks, facts.partial_offsets)] == \
                [a.tolist() for a in partial]
            assert areas == whole_areas
            if path == paths[0]:
                assert any(area[0] == "stale-block" for area in areas)


@pytest.fixture(scope="module")
def qemu_chain64(tmp_path_factory):
    return build_scale_chain(str(tmp_path_factory.mktemp("qchain64")))


@pytest.mark.slow
@pytest.mark.parametrize("command", [["diff"], ["diff", "--blocks"], ["slack"]], ids=" ".join)
def test_diff_and_slack_on_a_qemu_made_64t_chain_stay_under_256_mib(qemu_chain64, tmp_path, command):
    code, rss, out = run_measured([*command, qemu_chain64.top], tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT
