"""``merge --verify``: the chain's view before the merge against the destination's view after it, block by block,
in memory and time that follow the data held (never the virtual size)."""

from __future__ import annotations

import os
import time
from unittest import mock

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import vhdx
from tests.support.merge_chains import read_view
from tests.test_scale import RSS_LIMIT, private_copies, run_measured
from vhdx.format import constants as c
from vhdx.ops.create import create
from vhdx.ops.merge import run as run_module
from vhdx.ops.merge import verify as verify_module
from vhdx.ops.merge.relink import open_writable
from vhdx.ops.merge.verify import Difference, compare_view, digest_view
from vhdx.ops.resize import resize_image
from vhdx_cli.main import cli
from vhdx_fixtures.scale import TiB

MiB = 1 << 20
GiB = 1 << 30
# Measured 3.6 s (2.7 s without --verify) on a quiet machine; the whole-disk verification it replaces read
# 128 TiB of zeros here: about a day.
VERIFY_64T_SECONDS = 30


@pytest.fixture(scope="module")
def chain64(tmp_path_factory):
    """A 64 TiB base with 1 MiB blocks and 3 MiB of data, and an empty child, made by ``create`` (sparse BATs)."""
    folder = tmp_path_factory.mktemp("vchain64")
    base, child = str(folder / "base.vhdx"), str(folder / "c1.avhdx")
    create(base, 64 * TiB, block_size=MiB)
    with vhdx.open(base, writable=True) as image:
        image.write(0, b"\xb0" * (2 * MiB))
        image.write(64 * TiB - MiB, b"\xb1" * MiB)
    create(child, parent=base)
    return base, child


@pytest.fixture
def child64(chain64, tmp_path):
    """A private copy of the 64 TiB chain (sparse copies: the BATs stay holes)."""
    return private_copies(chain64, tmp_path)


def test_merge_verify_of_a_64t_chain_stays_under_256_mib_and_takes_seconds(child64, tmp_path):
    base, child = child64
    data = bytes(range(256)) * 4096
    with vhdx.open(child, writable=True) as image:
        image.write(MiB, data)  # over the base's data
        image.write(33 * TiB + 512, b"\x77" * 1024)  # a partially present block
        image.write(40 * TiB, bytes(MiB))  # data whose bytes are zeros
    started = time.monotonic()
    code, rss, out = run_measured(["merge", child, "--verify"], tmp_path / "out", VERIFY_64T_SECONDS)
    seconds = time.monotonic() - started
    assert code == 0, out
    assert rss < RSS_LIMIT
    assert seconds < VERIFY_64T_SECONDS
    assert not os.path.exists(child)
    with vhdx.open(base) as image:
        assert image.read(0, 2 * MiB) == b"\xb0" * MiB + data
        assert image.read(33 * TiB, 2048) == bytes(512) + b"\x77" * 1024 + bytes(512)
        assert image.read(64 * TiB - MiB, MiB) == b"\xb1" * MiB


def test_merge_verify_into_256_mib_blocks_stays_under_256_mib(tmp_path):
    """Blocks are digested in pieces as they are read: a 256 MiB block is never held whole (nor its zeros)."""
    base, child = str(tmp_path / "base.vhdx"), str(tmp_path / "c1.avhdx")
    create(base, GiB, block_size=256 * MiB)
    with vhdx.open(base, writable=True) as image:
        image.write(0, b"\x01" * MiB)
    create(child, parent=base, block_size=2 * MiB)
    with vhdx.open(child, writable=True) as image:
        image.write(300 * MiB, b"\x02" * MiB)
    code, rss, out = run_measured(["merge", child, "--verify"], tmp_path / "out", 120)
    assert code == 0, out
    assert rss < RSS_LIMIT
    with vhdx.open(base) as image:
        assert image.read(0, MiB) == b"\x01" * MiB and image.read(300 * MiB, MiB) == b"\x02" * MiB


# --- a wrong byte is caught -------------------------------------------------------------------------------
def _small_chain(folder) -> tuple[list[str], bytes]:
    """8 MiB base (1 MiB blocks) with data in blocks 0-1 and a child with data in blocks 1 and 3 (child first)."""
    base, child = str(folder / "base.vhdx"), str(folder / "snap.avhdx")
    create(base, 8 * MiB, block_size=MiB)
    with vhdx.open(base, writable=True) as image:
        image.write(0, b"\x11" * (2 * MiB))
    create(child, parent=base, block_size=MiB)
    with vhdx.open(child, writable=True) as image:
        image.write(MiB + 4096, b"\x22" * 4096)
        image.write(3 * MiB, b"\x33" * MiB)
    return [child, base], read_view(child)


def _plant_after_the_data_phase(monkeypatch, offset: int, data: bytes) -> None:
    """Write ``data`` into the destination right after the merge's data phase, before its verification."""
    data_phase = run_module._write_destination

    def planting(journal, plan, sources, child_items, opener, progress):
        moved = data_phase(journal, plan, sources, child_items, opener, progress)
        with open_writable(journal.destination, opener) as image:
            image.writer.begin(changes_data=True, data_write_guid=journal.new_guid)
            image.write(offset, data)
        return moved

    monkeypatch.setattr(run_module, "_write_destination", planting)


def _merge_verify(child: str):
    return CliRunner().invoke(cli, ["merge", child, "--verify"])


def test_merge_verify_catches_a_wrong_byte_in_a_data_block(tmp_path, monkeypatch):
    (child, _base), _view = _small_chain(tmp_path)
    _plant_after_the_data_phase(monkeypatch, MiB + 5, b"\xee")
    result = _merge_verify(child)
    assert result.exit_code == 1, result.output
    assert "verification failed: 1 block(s) differ after the merge (first: block 1)" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert os.path.exists(child)  # the merged files stay


def test_merge_verify_catches_a_byte_in_a_block_that_read_zeros_before(tmp_path, monkeypatch):
    (child, _base), _view = _small_chain(tmp_path)
    _plant_after_the_data_phase(monkeypatch, 6 * MiB + 7, b"\x01")
    result = _merge_verify(child)
    assert result.exit_code == 1, result.output
    assert "verification failed: 1 block(s) differ after the merge (first: block 6)" in result.output
    assert os.path.exists(child)


def test_merge_verify_counts_every_differing_block_and_names_the_first(tmp_path, monkeypatch):
    (child, _base), _view = _small_chain(tmp_path)
    _plant_after_the_data_phase(monkeypatch, 3 * MiB, b"\x00" * MiB + b"\x01" * 512)  # block 3 zeroed, 4 set
    result = _merge_verify(child)
    assert "verification failed: 2 block(s) differ after the merge (first: block 3)" in result.output


def test_merge_verify_compares_bytes_not_allocation(tmp_path, monkeypatch):
    (child, base), view = _small_chain(tmp_path)
    _plant_after_the_data_phase(monkeypatch, 6 * MiB, bytes(MiB))  # data held, but its bytes are zeros
    result = _merge_verify(child)
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    with vhdx.open(base) as image:
        assert image.bat.payload_at(6)[0] == c.BatState.FULLY_PRESENT
    assert read_view(base) == view


# --- agrees with a whole-disk comparison ------------------------------------------------------------------
# (what, layer (0 child, 1 base), offset, length), offset and length in 4 KiB units of a disk of about 5 MiB;
# the *_whole kinds round them out to 4 MiB (the largest block drawn), so that whole blocks stop holding data.
_OPS = st.lists(st.tuples(st.sampled_from(("write", "zero_bytes", "write_zeros", "discard", "same_bytes",
                                           "write_zeros_whole", "discard_whole")),
                          st.integers(0, 1), st.integers(0, 1300), st.integers(1, 600)), max_size=8)


def _apply(disk, what: str, offset: int, length: int, fill: int) -> None:
    if what.endswith("_whole"):
        what, end = what[: -len("_whole")], -(-(offset + length) // (4 * MiB)) * 4 * MiB
        offset = offset // (4 * MiB) * 4 * MiB
        length = end - offset
    length = min(length, disk.virtual_size - offset)
    if length <= 0:
        return
    if what == "write":  # a pattern that changes every sector: a misplaced run shows
        disk.write(offset, ((np.arange(length) // 512 + fill) % 251 + 1).astype(np.uint8).tobytes())
    elif what == "zero_bytes":  # data held whose bytes are zeros
        disk.write(offset, bytes(length))
    elif what == "write_zeros":
        disk.write_zeros(offset, length)
    elif what == "discard":
        disk.discard(offset, length)
    else:  # the bytes it reads, written again: the allocation changes, the content does not
        disk.write(offset, disk.read(offset, length))


def _chain(folder, name: str, size: int, base_block: int, child_block: int, base_type: str, ops) -> str:
    """A base and a child of the given block sizes, with ``ops`` applied (the base's first); returns the child."""
    base, child = str(folder / f"{name}.vhdx"), str(folder / f"{name}.avhdx")
    create(base, size, type=base_type, block_size=base_block)
    for path, layer in ((base, 1), (child, 0)):
        if layer == 0:
            create(child, parent=base, block_size=child_block)
        with vhdx.open(path, writable=True) as disk:
            for i, (what, where, offset, length) in enumerate(ops):
                if where == layer:
                    _apply(disk, what, offset * 4096, length * 4096, i)
    return child


@given(blocks=st.tuples(*[st.sampled_from((1, 2, 4))] * 5), sectors=st.integers(1, 24),
       base_types=st.tuples(*[st.sampled_from(("dynamic", "fixed"))] * 2), ops=_OPS, changes=_OPS,
       chunk=st.sampled_from((12 * 1024, MiB + 512, 8 * MiB)), window=st.sampled_from((1, 3, 1 << 18)))
def test_verify_agrees_with_a_whole_disk_comparison_of_the_two_views(tmp_path_factory, blocks, sectors, base_types,
                                                                     ops, changes, chunk, window):
    """Two chains of other block sizes and types with the same ops, the second changed further by ``changes``.

    Reads of ``chunk`` bytes: blocks are digested across several reads, and reads end inside blocks; extent
    windows of ``window`` MiB: several windows per disk.
    """
    folder = tmp_path_factory.mktemp("views")
    verify_block = blocks[4] * MiB
    size = 5 * MiB + sectors * 4096  # the last verified block is partial
    before = _chain(folder, "a", size, blocks[0] * MiB, blocks[1] * MiB, base_types[0], ops)
    after = _chain(folder, "b", size, blocks[2] * MiB, blocks[3] * MiB, base_types[1], ops + changes)
    one, two = read_view(before), read_view(after)
    differ = [b for b in range(-(-size // verify_block))
              if one[b * verify_block : (b + 1) * verify_block] != two[b * verify_block : (b + 1) * verify_block]]
    with (vhdx.open(before) as a, vhdx.open(after) as b, mock.patch.object(verify_module, "COPY_CHUNK", chunk),
          mock.patch.object(verify_module, "WINDOW_BLOCKS", window)):
        got = compare_view(digest_view(a, verify_block, size), b)
    assert got == Difference(len(differ), differ[0] if differ else None)


def test_verify_counts_differences_over_every_extent_window_and_names_the_first(tmp_path, monkeypatch):
    monkeypatch.setattr(verify_module, "WINDOW_BLOCKS", 1)  # one 1 MiB block per window
    ops = [("write", 1, 0, 1536)]  # 6 MiB of data in the base
    before = _chain(tmp_path, "a", 8 * MiB, MiB, MiB, "dynamic", ops)
    after = _chain(tmp_path, "b", 8 * MiB, MiB, MiB, "dynamic",
                   [*ops, ("write", 0, 256 + 3, 1), ("write_zeros_whole", 0, 1024, 1), ("write", 0, 1792, 1)])
    with vhdx.open(before) as a, vhdx.open(after) as b:
        got = compare_view(digest_view(a, MiB), b)
    assert got == Difference(4, 1)  # block 1 rewritten, blocks 4 and 5 zeroed, block 7 written


def test_merge_into_a_parent_whose_bat_region_already_holds_64t_stays_under_256_mib(tmp_path):
    """A child larger than its parent: the parent's BAT grows inside its region (sized for 64 TiB: 512 MiB).

    The new entries are cleared a window at a time where they are not zeros already, not staged as one buffer of
    the whole growth.
    """
    base, child = str(tmp_path / "base.vhdx"), str(tmp_path / "c1.avhdx")
    create(base, 64 * TiB, block_size=MiB)
    resize_image(base, GiB)  # the region keeps its 512 MiB
    with vhdx.open(base, writable=True) as image:
        assert image.regions.bat.length >= 512 * MiB
        image.write(0, b"\x01" * MiB)
    create(child, parent=base, size=64 * TiB)
    with vhdx.open(child, writable=True) as image:
        image.write(40 * TiB, b"\x02" * MiB)
    code, rss, out = run_measured(["merge", child], tmp_path / "out", 120)
    assert code == 0, out
    assert rss < RSS_LIMIT
    with vhdx.open(base) as image:
        assert image.virtual_size == 64 * TiB
        assert image.read(0, MiB) == b"\x01" * MiB and image.read(40 * TiB, MiB) == b"\x02" * MiB
        assert image.read(50 * TiB, MiB) == bytes(MiB)
