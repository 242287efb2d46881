"""convert -O raw leaves zero runs inside allocated blocks as holes (whole 4 KiB granules, found with numpy) and
still writes a byte-identical image; --no-sparse writes every byte (a fully allocated file)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdx
from vhdx.ops.create import create
from vhdx.ops.export import export_raw
from vhdx_cli.main import cli

MiB = 1 << 20


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def disk_with_zero_filled_blocks(tmp_path) -> str:
    """16 MiB, 1 MiB blocks: block 0 data, blocks 1-3 written with zeros (allocated), block 4 one 4 KiB of data in
    zeros, block 6 a 512-byte write at an odd sector, the rest never written."""
    path = str(tmp_path / "z.vhdx")
    create(path, size=16 * MiB, block_size=MiB)
    rng = np.random.default_rng(5)
    with vhdx.open(path, writable=True) as disk:
        disk.write(0, rng.integers(1, 256, MiB, dtype=np.uint8).tobytes())
        disk.write(MiB, bytes(3 * MiB))
        disk.write(4 * MiB, bytes(MiB))
        disk.write(4 * MiB + 8192, b"\x01" * 4096)
        disk.write(6 * MiB + 3 * 512, b"\x02" * 512)
    return path


def content(path) -> bytes:
    with vhdx.open(path) as disk:
        return disk.read(0, disk.virtual_size)


def test_raw_export_leaves_zero_runs_inside_allocated_blocks_as_holes(tmp_path):
    path = disk_with_zero_filled_blocks(tmp_path)
    out = tmp_path / "out.raw"
    with vhdx.open(path) as disk:
        written = export_raw(disk, out)
    assert out.read_bytes() == content(path)
    assert written == MiB + 4096 + 4096  # block 0, the 4 KiB of block 4, the granule holding block 6's sector
    assert allocated(out) <= MiB + 64 * 1024


def test_raw_export_without_sparse_writes_every_byte(tmp_path):
    path = disk_with_zero_filled_blocks(tmp_path)
    out = tmp_path / "out.raw"
    with vhdx.open(path) as disk:
        assert export_raw(disk, out, sparse=False) == 16 * MiB
    assert out.read_bytes() == content(path)
    assert allocated(out) >= 16 * MiB


def test_convert_cli_is_sparse_by_default_and_no_sparse_allocates_everything(tmp_path):
    path = disk_with_zero_filled_blocks(tmp_path)
    sparse, full = tmp_path / "sparse.raw", tmp_path / "full.raw"
    for args in (["convert", path, str(sparse)], ["convert", path, str(full), "--no-sparse"]):
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 0, out.output
    assert sparse.read_bytes() == full.read_bytes() == content(path)
    assert allocated(sparse) <= MiB + 64 * 1024 < 16 * MiB <= allocated(full)


def test_raw_export_of_a_chain_is_byte_identical_with_zero_runs_over_parent_data(tmp_path):
    base = str(tmp_path / "base.vhdx")
    create(base, size=8 * MiB, block_size=MiB)
    with vhdx.open(base, writable=True) as disk:
        disk.write(0, b"\xff" * (4 * MiB))
    child = str(tmp_path / "child.vhdx")
    create(child, parent=base)
    with vhdx.open(child, writable=True) as disk:  # zeros over the parent's data: they must read as zeros
        disk.write(MiB + 512, bytes(8192))
        disk.write(3 * MiB, bytes(MiB))
    out = tmp_path / "out.raw"
    with vhdx.open(child) as disk:
        export_raw(disk, out)
    assert out.read_bytes() == content(child)


def test_no_sparse_is_refused_for_a_vhdx_output(tmp_path):
    path = disk_with_zero_filled_blocks(tmp_path)
    out = CliRunner().invoke(cli, ["convert", path, str(tmp_path / "o.vhdx"), "-O", "vhdx", "--no-sparse"])
    assert out.exit_code != 0 and "--no-sparse applies to -O raw" in out.output
    assert not (tmp_path / "o.vhdx").exists()


WRITES = st.lists(st.tuples(st.integers(0, 8 * 8 - 1), st.integers(1, 24), st.sampled_from([b"\0", b"\x5a"])),
                  max_size=10)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=WRITES)
def test_sparse_raw_export_and_block_status_agree_with_the_bytes_for_random_writes(tmp_path_factory, writes):
    from vhdx.forensics.nbd import block_status

    tmp = tmp_path_factory.mktemp("prop")
    path = str(tmp / "p.vhdx")
    create(path, size=4 * MiB, block_size=MiB)
    with vhdx.open(path, writable=True) as disk:
        for sector_unit, sectors, byte in writes:  # units of 64 KiB, lengths in 512-byte sectors
            offset = sector_unit * 65536 + 512 * (sector_unit % 3)
            disk.write(offset, byte * min(sectors * 512, disk.virtual_size - offset))
    expected = content(path)
    out = tmp / "out.raw"
    with vhdx.open(path) as disk:
        export_raw(disk, out)
        status = block_status(disk, 0, disk.virtual_size, hole=3, zero=2)
    assert out.read_bytes() == expected
    assert status[0][0] == 0 and status[-1][0] + status[-1][1] == len(expected)
    for (start, length, flags), following in zip(status, [*status[1:], None], strict=True):
        if flags:
            assert expected[start : start + length] == bytes(length)
        if following is not None:
            assert start + length == following[0]


def holes(path, granule: int = 4096) -> np.ndarray:
    """True for each granule of the file that is a hole (asked with SEEK_DATA/SEEK_HOLE)."""
    size = os.path.getsize(path)
    hole = np.ones(-(-size // granule), dtype=bool)
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, data, os.SEEK_HOLE)
            hole[data // granule : -(-end // granule)] = False
            pos = end
    finally:
        os.close(fd)
    return hole


CHAIN_OP = st.tuples(st.sampled_from(["data", "zero data", "write_zeros"]), st.integers(0, 10**6),
                     st.integers(1, 40))


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(1, 5), sector=st.sampled_from([512, 4096]), seed=st.integers(0, 2**32 - 1),
       blocks=st.lists(st.sampled_from([MiB, 2 * MiB]), min_size=6, max_size=6),
       ops=st.lists(st.lists(CHAIN_OP, max_size=8), min_size=6, max_size=6), extra_sectors=st.integers(0, 9),
       buffer_granules=st.sampled_from([2, 3, 16, 2048]))
def test_sparse_raw_export_of_random_chains_equals_the_model_with_a_hole_at_every_zero_granule(
        tmp_path_factory, depth, sector, seed, blocks, ops, extra_sectors, buffer_granules):
    from unittest import mock

    import vhdx.ops.export as export_module

    folder = tmp_path_factory.mktemp("chain")
    size = 5 * MiB + extra_sectors * sector
    rng = np.random.default_rng(seed)
    model = np.zeros(size, dtype=np.uint8)
    paths = []
    for level in range(depth + 1):
        path = str(folder / (f"layer{level}.avhdx" if level else "base.vhdx"))
        if level:
            create(path, parent=paths[-1], block_size=blocks[level])
        else:
            create(path, size, block_size=blocks[0], logical_sector_size=sector)
        with vhdx.open(path, writable=True) as disk:
            for kind, where, sectors in ops[level]:
                offset = where % (size // sector) * sector
                length = min(sectors * sector, size - offset)
                if kind == "write_zeros":
                    disk.write_zeros(offset, length)
                    model[offset : offset + length] = 0
                    continue
                data = rng.integers(1, 256, length, dtype=np.uint8) if kind == "data" else np.zeros(length, np.uint8)
                if kind == "data" and length > 512:  # a whole zero granule inside written data
                    data[length // 2 : length // 2 + 4096] = 0
                disk.write(offset, data.tobytes())
                model[offset : offset + length] = data
        paths.append(path)
    out = folder / "out.raw"
    # Small buffers make the copy flush mid-run and split segments across buffers.
    with mock.patch.object(export_module, "COPY_CHUNK", buffer_granules * 4096), vhdx.open(paths[-1]) as disk:
        export_raw(disk, out)
    assert out.read_bytes() == model.tobytes()
    padded = np.concatenate((model, np.zeros(-size % 4096, np.uint8)))
    zero_granules = ~padded.reshape(-1, 4096).any(axis=1)
    assert (holes(out) == zero_granules).all()


def test_synced_raw_export_is_byte_identical_and_leaves_no_helper_thread(tmp_path):
    import threading

    path = disk_with_zero_filled_blocks(tmp_path)
    out = tmp_path / "out.raw"
    with vhdx.open(path) as disk:
        export_raw(disk, out, sync=True)
    assert out.read_bytes() == content(path)
    assert not [t for t in threading.enumerate() if t.name == "vhdx-write-behind"]


def test_raw_export_that_cannot_write_fails_in_one_error_and_leaves_no_output(tmp_path, monkeypatch):
    import errno

    import vhdx.ops.export as export_module

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    path = disk_with_zero_filled_blocks(tmp_path)
    out = tmp_path / "out.raw"
    monkeypatch.setattr(export_module.os, "pwrite", full)
    with vhdx.open(path) as disk, pytest.raises(vhdx.VhdxError, match="write failed: No space left on device"):
        export_raw(disk, out, sync=True)
    assert sorted(os.listdir(tmp_path)) == ["z.vhdx"]


def test_raw_export_finishes_every_write_the_kernel_takes_only_in_part(tmp_path, monkeypatch):
    import vhdx.ops.export as export_module

    real_pwrite = os.pwrite

    def short(fd, data, offset):
        return real_pwrite(fd, memoryview(data)[:1000], offset)

    path = disk_with_zero_filled_blocks(tmp_path)
    out = tmp_path / "out.raw"
    monkeypatch.setattr(export_module.os, "pwrite", short)
    with vhdx.open(path) as disk:
        export_raw(disk, out)
    monkeypatch.undo()
    assert out.read_bytes() == content(path)


@pytest.mark.parametrize("sparse", [True, False])
def test_synced_raw_export_flushes_the_file_before_it_takes_its_name(tmp_path, monkeypatch, sparse):
    import vhdx.ops.export as export_module

    path = disk_with_zero_filled_blocks(tmp_path)
    out = tmp_path / "out.raw"
    flushed_before_rename = []
    real_fsync = os.fsync

    def fsync(fd):
        flushed_before_rename.append(not out.exists())
        return real_fsync(fd)

    monkeypatch.setattr(export_module.os, "fsync", fsync)
    with vhdx.open(path) as disk:
        export_raw(disk, out, sync=True, sparse=sparse)
    assert out.read_bytes() == content(path)
    assert flushed_before_rename == [True]
