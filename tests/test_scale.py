"""64 TiB disks in bounded memory: sparse create, windowed BAT, and the RSS of info/chain/map/check.

The memory tests run the CLI in a subprocess and read its peak RSS (``RUSAGE_CHILDREN`` of a small
intermediate process). The CI chain has a sparse base made by ``create``; the qemu-made base (a 512 MiB
BAT written full of ZERO entries) is the slow variant.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import vhdx
from vhdx.errors import FormatError
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.ops.create import create
from vhdx.structures import bat as bat_module
from vhdx.structures.bat import BAT_DTYPE
from vhdx.structures.file import VhdxFile
from vhdx_fixtures.scale import SIZE, TiB, build_scale_chain

MiB = 1 << 20
RSS_LIMIT = 256 * MiB
CLI = "from vhdx_cli.main import cli; cli()"


# A small process between the test and the CLI: a child forked from a large pytest process counts that
# process's pages in its ru_maxrss; the grandchild, forked from this small one, reports its own peak.
_MEASURE = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
            "sys.exit(code)")


def run_measured(args: list[str], out_path, seconds: int | None = None) -> tuple[int, int, str]:
    """Run the CLI; returns (exit code, peak RSS in bytes of the CLI process, stdout + stderr).

    With ``seconds`` it runs under coreutils ``timeout`` (exit code 124 when it ran out of time).
    """
    rss_path = out_path.with_suffix(".rss")
    limit = ["timeout", str(seconds)] if seconds is not None else []
    with open(out_path, "wb") as out:
        code = subprocess.run([sys.executable, "-c", _MEASURE, str(rss_path), *limit, sys.executable, "-c", CLI,
                               *args], stdout=out, stderr=subprocess.STDOUT).returncode
    return code, int(rss_path.read_text()) * 1024, out_path.read_text()


def private_copies(paths, folder) -> tuple[str, ...]:
    """Copies of ``paths`` (a chain, base first) in ``folder``, same names; sparse: the BATs stay holes."""
    copies = tuple(str(folder / os.path.basename(p)) for p in paths)
    for src, dst in zip(paths, copies, strict=True):
        shutil.copyfile(src, dst)  # copy_file_range keeps holes on the file systems CI uses
    return copies


@pytest.fixture(scope="module")
def chain64(tmp_path_factory):
    return build_scale_chain(str(tmp_path_factory.mktemp("chain64")), qemu_base=False)


# --- create -----------------------------------------------------------------------------------------
def test_create_64t_leaves_the_bat_as_a_hole(tmp_path):
    path = tmp_path / "big.vhdx"
    create(path, 64 * TiB, block_size=MiB)
    st = os.stat(path)
    assert st.st_size > 512 * MiB  # the BAT region is part of the file ...
    assert st.st_blocks * 512 < 16 * MiB  # ... but not written


def test_create_fixed_bat_written_window_by_window_names_every_block(tmp_path, monkeypatch):
    monkeypatch.setattr("vhdx.ops.create.WINDOW_ENTRIES", 3 * 4097)  # 3 chunks per window, a partial last one
    path = tmp_path / "fixed.vhdx"
    create(path, 40 * 4 * 1024 * MiB + 5 * MiB, type="fixed", block_size=MiB)  # 40 chunks and 5 blocks
    with vhdx.open(path) as image:
        data_offset = image.regions.bat.file_offset + image.regions.bat.length
        blocks = np.arange(image.geometry.data_blocks)
        assert (image.bat.states == c.BatState.FULLY_PRESENT).all()
        assert (image.bat.offsets == data_offset + blocks * MiB).all()
        assert not image.bat.bitmap_entries.any()


# --- windows ------------------------------------------------------------------------------------------
@pytest.fixture
def small_windows(monkeypatch):
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", 2 * 4097)  # two chunks of 512-byte-sector/1 MiB blocks


def _written_disk(tmp_path, seed: int = 7) -> tuple[str, np.ndarray]:
    """A 40 GiB disk (10 chunks of 4096 blocks) with scattered whole blocks, some zeroed; returns the blocks."""
    path = str(tmp_path / "scattered.vhdx")
    create(path, 40 * 1024 * MiB, block_size=MiB)
    blocks = np.unique(np.random.default_rng(seed).integers(0, 40 * 1024, 60))
    with vhdx.open(path, writable=True) as image:
        for b in blocks.tolist():
            image.write(b * MiB, bytes([b % 251 + 1]) * 4096)
        image.write_zeros(int(blocks[3]) * MiB, MiB)
    return path, blocks


def test_payload_range_across_windows_equals_the_whole_bat(tmp_path, small_windows):
    path, _ = _written_disk(tmp_path)
    with vhdx.open(path) as windowed, vhdx.open(path) as whole:
        whole_states, whole_offsets = whole.bat.states, whole.bat.offsets  # reads the whole BAT
        rng = np.random.default_rng(1)
        for _ in range(40):
            b0 = int(rng.integers(0, windowed.geometry.data_blocks))
            b1 = int(rng.integers(b0, windowed.geometry.data_blocks + 1))
            states, offsets = windowed.bat.payload_range(b0, b1)
            assert (states == whole_states[b0:b1]).all() and (offsets == whole_offsets[b0:b1]).all()
            assert (windowed.bat.states_of(b0, b1) == whole_states[b0:b1]).all()
            assert (windowed.bat.state_view[b0:b1] == whole_states[b0:b1]).all()
        assert windowed.bat._entries is None  # never materialised


def test_state_counts_from_windows_equal_counts_of_the_whole_bat(tmp_path, small_windows):
    path, blocks = _written_disk(tmp_path)
    with vhdx.open(path) as image:
        counts = image.bat.state_counts()
        whole = np.bincount(image.bat.states, minlength=8)  # materialises for the comparison
    assert counts == {"NOT_PRESENT": int(whole[0]), "ZERO": 1, "FULLY_PRESENT": len(blocks) - 1}


def test_bat_window_cache_stays_bounded(tmp_path, small_windows):
    path, _ = _written_disk(tmp_path)
    with vhdx.open(path) as image:
        for b in range(0, image.geometry.data_blocks, 1000):
            image.read(b * MiB, 4096)
        assert len(image.bat._cache) <= bat_module.WINDOW_CACHE


def _set_entry(path: str, index: int, value: int) -> None:
    io = ImageIO.open(path)
    try:
        offset = VhdxFile.load(io, bat=False).regions.bat.file_offset
    finally:
        io.close()
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, np.array([value], dtype=BAT_DTYPE).tobytes(), offset + index * c.BAT_ENTRY_SIZE)
    finally:
        os.close(fd)


def _refusal(path: str) -> str:
    with pytest.raises(FormatError) as info:
        vhdx.open(path)
    return str(info.value)


def test_open_refusal_names_the_first_bad_entry_whatever_the_window_size(tmp_path, monkeypatch):
    path = str(tmp_path / "bad.vhdx")
    create(path, 40 * 1024 * MiB, block_size=MiB)
    _set_entry(path, 5 * 4097 + 3, 4)  # illegal state 4 in chunk 5 ...
    _set_entry(path, 8 * 4097 + 1, 4)  # ... and in chunk 8
    _set_entry(path, 9 * 4097 + 2, (1 << 40) | c.BatState.FULLY_PRESENT)  # beyond the end: a later rule
    one_window = _refusal(path)
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", 2 * 4097)
    windowed = _refusal(path)
    assert windowed == one_window
    assert f"BAT entry {5 * 4097 + 3} (payload block {5 * 4096 + 3})" in windowed
    assert "state 4 is not legal" in windowed and "(and 1 more)" in windowed


def test_data_spans_skip_holes(tmp_path):
    path = tmp_path / "holes.bin"
    with open(path, "wb") as fh:
        fh.truncate(64 * MiB)
        fh.seek(40 * MiB)
        fh.write(b"x" * MiB)
    io = ImageIO.open(str(path))
    try:
        spans = io.data_spans(0, 64 * MiB)
        assert io.data_spans(0, 32 * MiB) == []
    finally:
        io.close()
    assert len(spans) == 1 and spans[0][0] <= 40 * MiB < 41 * MiB <= spans[0][1]


# --- 64 TiB chain: memory of every reading command ----------------------------------------------------
def test_info_of_a_64t_child_stays_under_256_mib(chain64, tmp_path):
    code, rss, out = run_measured(["info", "--json", chain64.top], tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT
    bat = json.loads(out)["bat"]
    assert bat["state_counts"]["FULLY_PRESENT"] == 2 and bat["state_counts"]["PARTIALLY_PRESENT"] == 1
    assert bat["sector_bitmaps_present"] == 1


def test_chain_of_a_4_layer_64t_chain_stays_under_256_mib(chain64, tmp_path):
    code, rss, out = run_measured(["chain", "--json", chain64.top], tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT
    layers = json.loads(out)["layers"]
    assert len(layers) == 4 and layers[-1]["allocated_bytes"] == 3 * MiB


def test_map_of_a_4_layer_64t_chain_stays_under_256_mib(chain64, tmp_path):
    code, rss, out = run_measured(["map", "--json", chain64.top], tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT
    data = {(r["start"], r["layer"]) for r in json.loads(out)["extents"] if r["state"] == "data"}
    for depth, offsets in enumerate(chain64.writes):
        for offset in offsets:
            covered_above = any(offset in chain64.writes[d] for d in range(depth))
            assert covered_above or (offset, depth) in data
    assert (SIZE - MiB, 3) in data


def test_check_of_a_4_layer_64t_chain_stays_under_256_mib(chain64, tmp_path):
    code, rss, out = run_measured(["check", chain64.top], tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT


@pytest.fixture(scope="module")
def qemu_chain64(tmp_path_factory):
    return build_scale_chain(str(tmp_path_factory.mktemp("qchain64")))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["info", "chain", "map", "check"])
def test_commands_on_a_qemu_made_64t_chain_stay_under_256_mib(qemu_chain64, tmp_path, command):
    code, rss, out = run_measured([command, qemu_chain64.top], tmp_path / "out")
    assert code == 0, out
    assert rss < RSS_LIMIT
