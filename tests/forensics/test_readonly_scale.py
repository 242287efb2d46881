"""Read-only commands on 64 TiB chains stay under 256 MiB and skip what both sides know reads as zeros."""

from __future__ import annotations

import json

import pytest

from tests.test_scale import RSS_LIMIT, run_measured
from vhdx_fixtures.scale import TiB, build_scale_chain, place_blocks


@pytest.fixture(scope="module")
def two_chains(tmp_path_factory):
    """Two 4-layer 64 TiB chains with the same content, except one block written into the second's top."""
    a = build_scale_chain(str(tmp_path_factory.mktemp("a")), qemu_base=False)
    b = build_scale_chain(str(tmp_path_factory.mktemp("b")), qemu_base=False)
    place_blocks(b.top, [3 * TiB], 0xEE)
    return a, b


def test_compare_of_two_64t_chains_that_differ_in_one_block_stays_under_256_mib(two_chains, tmp_path):
    a, b = two_chains
    code, rss, out = run_measured(["compare", "--json", a.top, b.top], tmp_path / "out")
    assert code == 1, out
    assert rss < RSS_LIMIT
    result = json.loads(out)
    assert result["first_mismatch"] == 3 * TiB
    assert [(e["start"], e["length"]) for e in result["extents"]] == [(3 * TiB, 2 << 20)]


def test_partitions_of_a_64t_chain_stays_under_256_mib(two_chains, tmp_path):
    code, rss, out = run_measured(["partitions", two_chains[0].top], tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT
    assert "no MBR or GPT partition table" in out
