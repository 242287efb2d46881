"""``diff`` reports exactly what the layers wrote: property test against a model of the writes."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import vhdx
from tests.forensics.helpers import FileGuard, MiB, build_chain, pattern
from vhdx.errors import InvalidRequestError
from vhdx.forensics.diff import diff_layers, merge_ranges
from vhdx_cli.main import cli


def runs_of(mask: np.ndarray, unit: int, limit: int) -> list[tuple[int, int]]:
    """(start, length) of the True runs of a per-sector mask (a plain loop: the scalar reference)."""
    out, start = [], None
    for i, on in enumerate(list(mask) + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            out.append((start * unit, min(i * unit, limit) - start * unit))
            start = None
    return out


@st.composite
def chains(draw):
    lss = draw(st.sampled_from([512, 4096]))
    size = draw(st.integers(2 * MiB // lss, 5 * MiB // lss)) * lss
    depth = draw(st.integers(2, 3))
    block_sizes = [draw(st.sampled_from([MiB, 2 * MiB])) for _ in range(depth)]
    layers = []
    for d in range(depth):
        ops = []
        for n in range(draw(st.integers(0, 4))):
            kind = draw(st.sampled_from(["write", "write", "write", "zero", "discard"]))
            if kind == "write":
                offset = draw(st.integers(0, size - 1))
                length = draw(st.integers(1, min(size - offset, 3 * MiB // 2)))
                ops.append(("write", offset, pattern(d * 100 + n, length)))
            else:
                bs = block_sizes[d]
                first = draw(st.integers(0, (size - 1) // bs))
                count = draw(st.integers(1, 2))
                ops.append((kind, first * bs, min(count * bs, size - first * bs)))
        layers.append(ops)
    return lss, size, block_sizes, layers


def model(lss: int, size: int, block_sizes, layers):
    """Per layer: sectors held at block granularity, sectors held at sector granularity, and disk bytes."""
    sectors = size // lss
    held_block, held_sector, disks = [], [], []
    disk = bytearray(size)
    for d, ops in enumerate(layers):
        bs = block_sizes[d]
        by_block = np.zeros(sectors, bool)
        by_sector = np.zeros(sectors, bool)
        for kind, offset, arg in ops:
            if kind == "write":
                end = offset + len(arg)
                disk[offset:end] = arg
                s0, s1 = offset // lss, -(-end // lss)
                by_sector[s0:s1] = True
                for b in range(offset // bs, (end - 1) // bs + 1):
                    by_block[b * bs // lss : (b + 1) * bs // lss] = True
            else:
                end = offset + arg
                whole_first = -(-offset // bs)
                whole_last = end // bs if end < size else -(-size // bs)
                for b in range(whole_first, whole_last):
                    disk[b * bs : (b + 1) * bs] = bytes(len(disk[b * bs : (b + 1) * bs]))
                    by_block[b * bs // lss : (b + 1) * bs // lss] = True
                    by_sector[b * bs // lss : (b + 1) * bs // lss] = True
        held_block.append(by_block)
        held_sector.append(by_sector)
        disks.append(bytes(disk))
    return held_block, held_sector, disks


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@given(chains(), st.booleans(), st.booleans())
def test_diff_reports_exactly_the_written_extents(chain, sectors, against_base):
    lss, size, block_sizes, layers = chain
    held_block, held_sector, disks = model(lss, size, block_sizes, layers)
    held = held_sector if sectors else held_block
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_chain(Path(tmp), layers, size=size, block_sizes=block_sizes, logical_sector_size=lss)
        top = len(paths) - 1
        ancestor = 0 if against_base else top - 1
        mask = np.zeros(size // lss, bool)
        for d in range(ancestor + 1, top + 1):
            mask |= held[d]
        expected = runs_of(mask, lss, size)
        with vhdx.open(paths[-1]) as image:
            result = diff_layers(image, str(paths[0]) if against_base else None, sectors=sectors)
    assert [(e.start, e.length) for e in result.extents] == expected
    for e in result.extents:
        assert e.new_digest == sha(disks[top][e.start : e.start + e.length])
        assert e.old_digest == sha(disks[ancestor][e.start : e.start + e.length])
        owners = [top - d for d in range(ancestor + 1, top + 1)
                  if held[d][e.start // lss : (e.start + e.length) // lss].any()]
        assert list(e.layers) == sorted(owners)


def test_diff_sector_granularity_of_a_partial_block(small_chain):
    with vhdx.open(small_chain[1]) as image:
        by_sector = diff_layers(image, sectors=True)
        by_block = diff_layers(image)
    assert [(e.start, e.length) for e in by_sector.extents] == [(4096, 1024), (2 * MiB, MiB), (5 * MiB, MiB)]
    assert [(e.start, e.length) for e in by_block.extents] == [(0, MiB), (2 * MiB, MiB), (5 * MiB, MiB)]


def test_diff_against_grandparent_merges_both_layers(small_chain):
    with vhdx.open(small_chain[2]) as image:
        result = diff_layers(image, str(small_chain[0]), sectors=True)
    assert [(e.start, e.length, e.layers) for e in result.extents] == [
        (4096, 1024, (1,)), (MiB, 2 * MiB, (0, 1)), (5 * MiB, MiB, (1,)), (7 * MiB + 512, 2048, (0,))]


def test_diff_orphan_lists_absent_ranges_and_no_old_content(small_chain):
    with vhdx.open(small_chain[1], orphan=True) as image:
        result = diff_layers(image, sectors=True)
        expected_new = sha(image.read(4096, 1024))
    assert result.orphan and result.ancestor is None
    assert result.extents[0].old_digest is None and result.extents[0].new_digest == expected_new
    assert result.absent == ((0, 4096), (4096 + 1024, 2 * MiB - 5120), (3 * MiB, 2 * MiB), (6 * MiB, 2 * MiB))


def test_diff_refuses_an_ancestor_outside_the_chain(small_chain, tmp_path):
    (tmp_path / "other").mkdir()
    other = build_chain(tmp_path / "other", [[]])[0]
    with vhdx.open(small_chain[2]) as image, pytest.raises(InvalidRequestError, match="not a layer"):
        diff_layers(image, str(other))


def test_diff_merge_ranges_joins_touching_and_overlapping_ranges():
    starts, ends, group = merge_ranges(np.array([10, 0, 5, 30]), np.array([20, 5, 8, 40]))
    assert starts.tolist() == [0, 10, 30] and ends.tolist() == [8, 20, 40]
    assert group.tolist() == [1, 0, 0, 2]


def test_diff_cli_json_and_read_only(small_chain):
    guard = FileGuard(small_chain)
    result = CliRunner().invoke(cli, ["diff", str(small_chain[2]), "--against", str(small_chain[0]), "--sectors",
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["granularity"] == "sector" and len(data["extents"]) == 4
    assert {"start", "length", "layers", "new_sha256", "old_sha256"} <= set(data["extents"][0])
    guard.assert_unchanged()


def test_diff_cli_bad_algorithm_is_one_line_error(small_chain):
    result = CliRunner().invoke(cli, ["diff", str(small_chain[1]), "--algo", "nope"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "unknown hash algorithm" in result.output
