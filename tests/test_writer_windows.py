"""Writing through the windowed BAT: bounded memory on a 64 TiB chain, and the same results as the whole BAT.

The writer changes BAT entries by reading, changing and staging the 4 KiB BAT sectors that hold them; it never
reads the whole BAT. The memory tests run the CLI in a subprocess (see ``tests/test_scale.py``).
"""

from __future__ import annotations

import os
import random
import shutil
import uuid

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vhdx
from tests.test_scale import RSS_LIMIT, private_copies, run_measured
from vhdx.disk.writer import end_of_structures
from vhdx.format import constants as c
from vhdx.ops.check import check_image
from vhdx.ops.create import create
from vhdx.ops.merge.inputs import dest_kind_of, read_dest_arrays, read_layer_arrays
from vhdx.ops.merge.plan import DestArrays, LayerArrays, plan_merge, reusable_blocks
from vhdx.structures import bat as bat_module
from vhdx_fixtures.scale import TiB

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(scope="module")
def chain64(tmp_path_factory):
    """A 64 TiB base with 1 MiB blocks and an empty child, both made by ``create`` (sparse BATs)."""
    folder = tmp_path_factory.mktemp("wchain64")
    base, child = str(folder / "base.vhdx"), str(folder / "c1.avhdx")
    create(base, 64 * TiB, block_size=MiB)
    create(child, parent=base)
    return base, child


@pytest.fixture
def child64(chain64, tmp_path):
    """A private copy of the 64 TiB chain (sparse copies: the BATs stay holes)."""
    return private_copies(chain64, tmp_path)


# --- memory of writing commands on a 64 TiB chain ----------------------------------------------------
def test_write_of_one_mib_into_a_64t_child_stays_under_256_mib(child64, tmp_path):
    _base, child = child64
    data = tmp_path / "one"
    data.write_bytes(bytes(range(256)) * 4096)
    code, rss, out = run_measured(["write", child, "--offset", "1M", "--input", str(data)], tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT
    with vhdx.open(child) as image:
        assert image.read(MiB, MiB) == data.read_bytes()
        assert image.bat.payload_at(MiB // image.block_size)[0] in (c.BatState.FULLY_PRESENT,
                                                                    c.BatState.PARTIALLY_PRESENT)
        assert image.bat.summary.allocated_blocks == 1


def test_discard_of_a_64t_child_block_stays_under_256_mib(child64, tmp_path):
    _base, child = child64
    with vhdx.open(child, writable=True) as image:
        image.write(40 * TiB, b"\x5a" * image.block_size)
        length = image.block_size
    code, rss, out = run_measured(["discard", child, "--offset", str(40 * TiB), "--length", str(length)],
                                  tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT
    with vhdx.open(child) as image:
        assert image.bat.payload_at(40 * TiB // length)[0] == c.BatState.UNMAPPED
        assert image.read(40 * TiB, 4096) == bytes(4096)


# --- the windowed BAT update ------------------------------------------------------------------------------
def test_a_write_never_reads_the_whole_bat(tmp_path):
    path = str(tmp_path / "d.vhdx")
    create(path, 64 * TiB, block_size=MiB)
    with vhdx.open(path, writable=True) as image:
        image.write(5 * TiB, b"x" * 4096)
        image.discard(5 * TiB, MiB)
        image.write(5 * TiB + 512, b"y" * 512)  # reuses the block's space
        image.write_zeros(9 * TiB, 3 * MiB)
        assert image.bat._entries is None


def test_reads_in_a_session_see_the_staged_bat_sectors_across_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", 2 * 4097)
    path = str(tmp_path / "d.vhdx")
    create(path, 40 * GiB, block_size=MiB)
    with vhdx.open(path, writable=True) as image:
        image.read(0, 4096), image.read(39 * GiB, 4096)  # decode (and cache) the first and last windows
        image.write(0, b"a" * 4096)
        image.write(39 * GiB, b"b" * 4096)
        assert image.read(0, 4) == b"aaaa" and image.read(39 * GiB, 4) == b"bbbb"
        assert image.bat.state_counts()["FULLY_PRESENT"] == 2


# --- a random sequence of writes through the windowed BAT --------------------------------------------------
_OPS = st.lists(st.tuples(st.sampled_from(["write", "discard", "zero"]),
                          st.integers(0, 40 * 1024 - 3),  # first block (a 40 GiB disk: 10 chunks)
                          st.integers(0, 2 * MiB),  # offset in the block (writes cross into the next block)
                          st.integers(1, 3 * MiB)),  # length
                min_size=1, max_size=12)


def _model_op(content: dict[int, bytearray], n: int, op: str, offset: int, length: int) -> None:
    """Apply one operation to a byte model of the disk (touched blocks only; everything else reads zeros)."""
    end = offset + length
    first, last = -(-offset // MiB), end // MiB if end < 40 * GiB else 40 * 1024
    for b in range(offset // MiB, -(-end // MiB)):
        lo, hi = max(offset, b * MiB) - b * MiB, min(end, (b + 1) * MiB) - b * MiB
        data = content.setdefault(b, bytearray(MiB))
        if op == "write":
            data[lo:hi] = bytes([n % 250 + 1]) * (hi - lo)
        elif op == "zero" or first <= b < last:  # a discard changes whole blocks only
            data[lo:hi] = bytes(hi - lo)


def _run(path: str, ops, whole: bool) -> dict[int, bytearray]:
    """Apply ``ops``, reading each range back in the session (through the staged BAT); returns the byte model."""
    rng = random.Random(1)
    content: dict[int, bytearray] = {}
    with vhdx.open(path, writable=True) as image:
        image.writer.new_guid = lambda: uuid.UUID(int=rng.getrandbits(128))
        if whole:
            image.bat.entries  # noqa: B018 - read the whole BAT: the arrays path
        for n, (op, block, within, length) in enumerate(ops):
            offset = block * MiB + within
            length = min(length, 40 * GiB - offset)
            if op == "write":
                image.write(offset, bytes([n % 250 + 1]) * length)
            elif op == "discard":
                image.discard(offset, length)
            else:
                image.write_zeros(offset, length)
            _model_op(content, n, op, offset, length)
            b0, b1 = offset // MiB, -(-(offset + length) // MiB)
            assert image.read(b0 * MiB, (b1 - b0) * MiB) == b"".join(bytes(content[b]) for b in range(b0, b1))
            if n % 4 == 3:
                image.flush()
    return content


@given(ops=_OPS, parent=st.booleans())
def test_random_writes_through_small_windows_match_the_whole_bat_and_a_model(tmp_path_factory, ops, parent):
    folder = tmp_path_factory.mktemp("ops")
    base = str(folder / "base.vhdx")
    create(base, 40 * GiB, block_size=MiB)
    path = base
    if parent:
        path = str(folder / "child.avhdx")
        create(path, parent=base, block_size=MiB)
    twin = str(folder / ("twin" + os.path.splitext(path)[1]))
    shutil.copyfile(path, twin)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bat_module, "WINDOW_ENTRIES", 2 * 4097)  # two chunks per window: many windows crossed
        content = _run(path, ops, whole=False)
    _run(twin, ops, whole=True)
    with open(path, "rb") as a, open(twin, "rb") as b:
        assert a.read() == b.read()
    # The states a user expects, block by block (a model independent of the writer).
    expected: dict[int, int] = {}
    written = np.zeros(40 * 1024, dtype=bool)
    for op, block, within, length in ops:
        offset = block * MiB + within
        end = min(offset + length, 40 * GiB)
        first, last = -(-offset // MiB), end // MiB if end < 40 * GiB else 40 * 1024
        touched = range(offset // MiB, -(-end // MiB))
        if op == "write":
            for b in touched:
                written[b] = True
                expected[b] = -1  # present: fully or partially
        elif op == "discard":
            for b in range(first, last):
                if expected.get(b, 0) != c.BatState.UNMAPPED:
                    expected[b] = c.BatState.UNMAPPED
        else:
            for b in range(first, last):
                expected[b] = c.BatState.ZERO
            for b in touched:
                if not first <= b < last:
                    expected[b] = -1
    with vhdx.open(path) as image:
        states, _offsets = image.bat.payload_range(0, 40 * 1024)
        for b, want in expected.items():
            got = int(states[b])
            if want == -1:
                assert got in (c.BatState.FULLY_PRESENT, c.BatState.PARTIALLY_PRESENT), b
            else:
                assert got == want, b
        untouched = np.ones(40 * 1024, dtype=bool)
        untouched[list(expected)] = False
        assert not states[untouched].any()
    # What the disk reads after the sessions: every touched block against the byte model.
    with vhdx.open(path) as image:
        for b, data in content.items():
            assert image.read(b * MiB, MiB) == bytes(data), b
    assert check_image(path).exit_code == 0


# --- merge -------------------------------------------------------------------------------------------------
def test_merge_of_a_64t_child_stays_under_256_mib(child64, tmp_path):
    base, child = child64
    data = bytes(range(256)) * 4096
    with vhdx.open(child, writable=True) as image:
        image.write(MiB, data)
        image.write(33 * TiB + 512, b"\x77" * 1024)  # a partially present block
    code, rss, out = run_measured(["merge", child], tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT
    with vhdx.open(base) as image:
        assert image.read(MiB, MiB) == data
        assert image.read(33 * TiB, 2048) == bytes(512) + b"\x77" * 1024 + bytes(512)


def _whole_bat_inputs(layers, dest):
    """The plan inputs as whole-BAT arrays (how they were read before the windowed columns)."""
    def arrays(image):
        windowed = read_layer_arrays(image)
        return LayerArrays(image.virtual_size, image.block_size, image.logical_sector_size, image.bat.states.copy(),
                           image.bat.offsets.copy(), windowed.partial_blocks, windowed.partial_bitmaps)

    bat = dest.bat
    present = bat.allocated_blocks()
    sb = bat.bitmap_states == c.SbState.PRESENT
    h = dest.headers.current
    regions = [(0, c.HEADER_SECTION_SIZE), (h.log_offset, h.log_offset + h.log_length),
               (dest.regions.bat.file_offset, dest.regions.bat.end),
               (dest.regions.metadata.file_offset, dest.regions.metadata.end)]
    held = [(bat.offsets[present], bat.offsets[present] + dest.block_size),
            (bat.bitmap_offsets[sb], bat.bitmap_offsets[sb] + c.SECTOR_BITMAP_BLOCK_SIZE),
            (np.array([r[0] for r in regions], np.int64), np.array([r[1] for r in regions], np.int64))]
    reusable = reusable_blocks(bat.states, bat.offsets, dest.block_size, dest.io.real_size, held)
    return ([arrays(layer) for layer in layers],
            DestArrays(arrays(dest), dest_kind_of(dest), sb.copy() if dest.has_parent else np.zeros(len(sb), bool),
                       bat.bitmap_offsets.copy(), reusable, end_of_structures(dest), dest.io.real_size))


def test_merge_plan_from_windowed_columns_equals_the_plan_from_whole_bat_arrays(tmp_path, monkeypatch):
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", 2 * 4097)
    monkeypatch.setattr("vhdx.ops.merge.plan.WINDOW_UNITS", 3000)  # planning windows unlike the BAT's
    base, mid, top = (str(tmp_path / n) for n in ("base.vhdx", "mid.avhdx", "top.avhdx"))
    create(base, 40 * GiB, block_size=MiB)
    with vhdx.open(base, writable=True) as image:
        for b in (0, 5, 4096, 9000, 20000, 39 * 1024):
            image.write(b * MiB, bytes([b % 200 + 1]) * MiB)
        image.discard(9000 * MiB, MiB)  # UNMAPPED, keeps its space: reusable
        image.write_zeros(20000 * MiB, MiB)  # ZERO, keeps its space
    create(mid, parent=base, block_size=MiB)
    with vhdx.open(mid, writable=True) as image:
        image.write(9000 * MiB + 4096, b"m" * 4096)  # partial
        image.write(30000 * MiB, b"n" * MiB)
    create(top, parent=mid, block_size=MiB)
    with vhdx.open(top, writable=True) as image:
        image.write(20000 * MiB, b"t" * 8192)
        image.write(5 * MiB + 512, b"u" * 512)
        image.discard(30000 * MiB, MiB)
    with vhdx.open(top) as image:
        layers = [image, image.parent]
        dest = image.parent.parent
        windowed = plan_merge([read_layer_arrays(layer) for layer in layers], read_dest_arrays(dest))
        whole = plan_merge(*_whole_bat_inputs(layers, dest))
    assert windowed.blocks_touched == 4 and windowed.reused_blocks == 2  # 9000 and 20000 kept their space
    assert windowed.digest == whole.digest


# --- convert, resize, compact -------------------------------------------------------------------------------
def test_convert_of_a_64t_disk_to_vhdx_stays_under_256_mib(child64, tmp_path):
    base, _child = child64
    with vhdx.open(base, writable=True, force=True) as image:
        image.write(7 * TiB, b"\x42" * MiB)
    out_path = str(tmp_path / "copy.vhdx")
    code, rss, out = run_measured(["convert", base, "-O", "vhdx", out_path], tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT
    with vhdx.open(out_path) as image:
        assert image.read(7 * TiB, MiB) == b"\x42" * MiB
        assert image.bat.summary.allocated_blocks == 1


def test_resize_of_a_64t_disk_to_32t_stays_under_256_mib(tmp_path):
    path = str(tmp_path / "big.vhdx")
    create(path, 64 * TiB, block_size=MiB)
    with vhdx.open(path, writable=True) as image:
        image.write(20 * TiB, b"\x33" * MiB)
    code, rss, out = run_measured(["resize", path, "--size", "32T"], tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT
    with vhdx.open(path) as image:
        assert image.virtual_size == 32 * TiB and image.read(20 * TiB, MiB) == b"\x33" * MiB
    assert check_image(path).exit_code == 0


def test_resize_of_a_1t_disk_to_64t_stays_under_256_mib(tmp_path):
    path = str(tmp_path / "grow.vhdx")
    create(path, TiB, block_size=MiB)
    with vhdx.open(path, writable=True) as image:
        image.write(TiB - MiB, b"\x44" * MiB)
    code, rss, out = run_measured(["resize", path, "--size", "64T"], tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT
    with vhdx.open(path) as image:
        assert image.virtual_size == 64 * TiB and image.read(TiB - MiB, MiB) == b"\x44" * MiB
    assert check_image(path).exit_code == 0


def test_compact_of_a_64t_disk_stays_under_256_mib(tmp_path):
    path = str(tmp_path / "k.vhdx")
    create(path, 64 * TiB, block_size=MiB)
    with vhdx.open(path, writable=True) as image:
        image.write(5 * TiB, b"\x55" * MiB)
        image.write(6 * TiB, b"\x66" * MiB)
        image.write(9 * TiB, bytes(MiB))  # an all-zero block: released
        image.discard(5 * TiB, MiB)  # its space is given up and the block at 6 TiB moves down into it
    before = os.path.getsize(path)
    code, rss, out = run_measured(["compact", path], tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT
    assert os.path.getsize(path) == before - 2 * MiB
    with vhdx.open(path) as image:
        assert image.read(6 * TiB, MiB) == b"\x66" * MiB
        assert image.bat.summary.allocated_blocks == 1
    assert check_image(path).exit_code == 0
