"""`diff` is sector-exact by default (--blocks for whole blocks); `compare` tells two unrelated disks apart."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import vhdx
from tests.forensics.helpers import build_chain
from vhdx.forensics.compare import compare_disks
from vhdx_cli.main import cli

KiB, MiB = 1 << 10, 1 << 20


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in (result.output or "")
    return result


@pytest.fixture()
def small_write(tmp_path):
    """A child that wrote 64 KiB into one 2 MiB block of its parent."""
    _, child = build_chain(tmp_path, [[], [("write", 3 * MiB, b"\x42" * 64 * KiB)]], block_sizes=[2 * MiB, 2 * MiB])
    return child


def test_diff_reports_a_64k_write_as_64k_by_default(small_write):
    data = json.loads(run("diff", "--json", small_write).output)
    assert data["granularity"] == "sector"
    assert data["written_bytes"] == 64 * KiB
    assert [(e["start"], e["length"]) for e in data["extents"]] == [(3 * MiB, 64 * KiB)]
    assert "64 KiB written" in run("diff", small_write).output


def test_diff_blocks_flag_reports_whole_blocks(small_write):
    data = json.loads(run("diff", "--blocks", "--json", small_write).output)
    assert data["granularity"] == "block" and data["written_bytes"] == 2 * MiB


def make_pair(tmp_path, a_writes, b_writes, *, size_a=8 * MiB, size_b=8 * MiB):
    paths = []
    for name, size, writes in (("a.vhdx", size_a, a_writes), ("b.vhdx", size_b, b_writes)):
        path = tmp_path / name
        vhdx.create_image(path, size, block_size=MiB)
        with vhdx.open(path, writable=True) as image:
            for offset, data in writes:
                image.write(offset, data)
        paths.append(path)
    return paths


def test_compare_identical_content_exits_0(tmp_path):
    # Same bytes, different layout: b holds zeros explicitly where a has nothing allocated.
    a, b = make_pair(tmp_path, [(MiB, b"x" * 4096)], [(0, bytes(MiB)), (MiB, b"x" * 4096)])
    result = run("compare", a, b)
    assert result.exit_code == 0, result.output
    assert "identical" in result.output


def test_compare_reports_the_first_differing_offset_and_exits_1(tmp_path):
    a, b = make_pair(tmp_path, [(MiB, b"x" * 4096)], [(MiB, b"x" * 1000 + b"y" + b"x" * 3095)])
    result = run("compare", a, b)
    assert result.exit_code == 1
    assert f"mismatch at offset {MiB + 1000}" in result.output


def test_compare_json_lists_every_differing_extent(tmp_path):
    a, b = make_pair(tmp_path, [(0, b"a" * 512), (5 * MiB, b"q" * 2048)], [(0, b"b" * 512), (6 * MiB, b"r" * 1024)])
    result = run("compare", "--json", a, b)
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["identical"] is False and data["first_mismatch"] == 0
    assert [(e["start"], e["length"]) for e in data["extents"]] == [(0, 512), (5 * MiB, 2048), (6 * MiB, 1024)]


def test_compare_different_sizes_compares_the_tail_with_zeros(tmp_path):
    a, b = make_pair(tmp_path, [(MiB, b"x" * 512)], [(MiB, b"x" * 512)], size_b=16 * MiB)
    assert run("compare", a, b).exit_code == 0
    result = run("compare", "--strict", a, b)
    assert result.exit_code == 1 and "size" in result.output


def test_compare_a_nonzero_tail_is_a_mismatch(tmp_path):
    a, b = make_pair(tmp_path, [], [(12 * MiB, b"t" * 512)], size_b=16 * MiB)
    result = compare_disks_paths(a, b)
    assert result.first_mismatch == 12 * MiB


def compare_disks_paths(a, b):
    with vhdx.open(a) as image_a, vhdx.open(b) as image_b:
        return compare_disks(image_a, image_b)


def test_compare_a_vhdx_with_a_raw_image(tmp_path):
    (a,) = make_pair(tmp_path, [(2 * MiB, b"z" * 4096)], [])[:1]
    raw = tmp_path / "a.raw"
    assert run("convert", a, raw).exit_code == 0
    assert run("compare", a, raw).exit_code == 0
    with open(raw, "r+b") as f:
        f.seek(7 * MiB + 3)
        f.write(b"!")
    result = run("compare", a, raw)
    assert result.exit_code == 1 and f"offset {7 * MiB + 3}" in result.output


def test_compare_an_unreadable_input_is_an_error_not_a_difference(tmp_path):
    a, _ = make_pair(tmp_path, [], [])
    bad = tmp_path / "bad.vhdx"
    bad.write_bytes(b"vhdxfile" + bytes(100))
    result = run("compare", a, bad)
    assert result.exit_code == 2  # as qemu-img compare: 0 identical, 1 different, 2 could not compare


def test_compare_running_out_of_memory_is_one_line_and_could_not_compare(tmp_path, monkeypatch):
    a, b = make_pair(tmp_path, [], [])

    def exhausted(*_args, **_kwargs):
        raise MemoryError

    monkeypatch.setattr("vhdx_cli.compare_cmds.compare_disks", exhausted)
    result = run("compare", a, b)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["vhdx: error: out of memory (the request or the file asks for more "
                                                 "than this machine can hold)"]


def test_compare_two_raw_images(tmp_path):
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(b"\x01" * 4096)
    b.write_bytes(b"\x01" * 4000 + b"\x02" * 96)
    result = run("compare", a, b)
    assert result.exit_code == 1 and "offset 4000" in result.output


@pytest.mark.parametrize("seed", range(6))
def test_compare_extents_match_a_byte_by_byte_comparison(tmp_path, seed):
    rng = np.random.default_rng(seed)
    writes = [[(int(rng.integers(0, 4 * MiB - 4096)), bytes([int(rng.integers(0, 3))]) * int(rng.integers(1, 4096)))
               for _ in range(int(rng.integers(0, 6)))] for _ in range(2)]
    a, b = make_pair(tmp_path, *writes, size_a=4 * MiB, size_b=int(rng.choice([4, 5])) * MiB)
    with vhdx.open(a) as image_a, vhdx.open(b) as image_b:
        result = compare_disks(image_a, image_b)
        bytes_a = np.frombuffer(image_a.read(0, image_a.virtual_size), np.uint8)
        bytes_b = np.frombuffer(image_b.read(0, image_b.virtual_size), np.uint8)
    bytes_a = np.concatenate((bytes_a, np.zeros(len(bytes_b) - len(bytes_a), np.uint8)))
    diff = np.flatnonzero(bytes_a != bytes_b)
    assert result.first_mismatch == (int(diff[0]) if len(diff) else None)
    sectors = sorted(set((diff // 512).tolist()))
    covered = sorted({s for start, length in result.extents for s in range(start // 512, (start + length) // 512)})
    assert covered == sectors
