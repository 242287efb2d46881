"""``serve`` answers NBD block status: holes where no layer supplies data, zeros for all-zero 4 KiB runs inside
data, so ``qemu-img convert``/``nbdcopy`` over NBD skip both (checked with ``qemu-img map`` as the client)."""

from __future__ import annotations

import json
import subprocess

import pytest

import vhdx
from tests.forensics.test_export import nbdkit_ready, stop, vhdx_cmd, wait_for  # noqa: F401 - fixture
from tests.test_export_sparse import MiB, allocated, content, disk_with_zero_filled_blocks
from vhdx.forensics import nbd

HOLE, ZERO = 3, 2  # NBD_STATE_HOLE | NBD_STATE_ZERO, NBD_STATE_ZERO


def test_block_status_reports_holes_zero_runs_inside_data_and_data(tmp_path):
    path = disk_with_zero_filled_blocks(tmp_path)
    with vhdx.open(path) as disk:
        status = nbd.block_status(disk, 0, disk.virtual_size, hole=HOLE, zero=ZERO)
    assert status == [
        (0, MiB, 0),  # data
        (MiB, 4 * MiB + 8192 - MiB, ZERO),  # blocks 1-3 written with zeros, and block 4 up to its 4 KiB of data
        (4 * MiB + 8192, 4096, 0),
        (4 * MiB + 12288, MiB - 12288, ZERO),
        (5 * MiB, MiB, HOLE),  # never written
        (6 * MiB, 4096, 0),  # the granule holding the 512-byte write
        (6 * MiB + 4096, MiB - 4096, ZERO),
        (7 * MiB, 9 * MiB, HOLE),
    ]


def test_block_status_starts_at_the_offset_asked_and_covers_the_count(tmp_path):
    path = disk_with_zero_filled_blocks(tmp_path)
    with vhdx.open(path) as disk:
        status = nbd.block_status(disk, 4 * MiB + 4096, 3 * MiB, hole=HOLE, zero=ZERO)
    assert status[0][0] == 4 * MiB + 4096
    assert status[-1][0] + status[-1][1] == 7 * MiB + 4096
    assert all(a[0] + a[1] == b[0] for a, b in zip(status, status[1:], strict=False))


def test_block_status_reads_at_most_the_scan_budget_and_stops_early(tmp_path):
    path = disk_with_zero_filled_blocks(tmp_path)
    with vhdx.open(path) as disk:
        status = nbd.block_status(disk, 0, disk.virtual_size, hole=HOLE, zero=ZERO, scan=MiB + MiB // 2)
    assert status[0] == (0, MiB, 0)
    assert status[-1][0] + status[-1][1] == MiB + MiB // 2  # the client asks again from here


@pytest.mark.peer
def test_serve_block_status_lets_qemu_img_map_and_convert_skip_holes_and_zeros(tmp_path, nbdkit_ready):  # noqa: F811
    path = disk_with_zero_filled_blocks(tmp_path)
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(vhdx_cmd("serve", path, "--unix", sock), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for(sock.exists, proc)
        uri = f"nbd+unix:///?socket={sock}"
        done = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", uri], capture_output=True,
                              text=True, timeout=60, check=True)
        mapped = json.loads(done.stdout)
        data = [(m["start"], m["length"]) for m in mapped if m["data"] and not m["zero"]]
        assert data == [(0, MiB), (4 * MiB + 8192, 4096), (6 * MiB, 4096)]
        zero = sum(m["length"] for m in mapped if m["zero"])
        assert zero == 16 * MiB - MiB - 2 * 4096
        out = tmp_path / "out.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", uri, "-O", "raw", str(out)], capture_output=True,
                       timeout=120, check=True)
        assert out.read_bytes() == content(path)
        assert allocated(out) <= MiB + 64 * 1024
    finally:
        assert stop(proc) == 0
