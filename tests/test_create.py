"""Creating disks: layout per spec, qemu-img accepts them, invalid requests fail before any file exists."""

from __future__ import annotations

import os
import random
import subprocess

import pytest

import vhdx
from tests.support.peers import need
from vhdx.errors import InvalidRequestError
from vhdx.format import constants as c
from vhdx.ops.create import create

MiB = 1 << 20


def qemu_img(*args) -> subprocess.CompletedProcess:
    return subprocess.run([need("qemu-img"), *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("disk_type", ["dynamic", "fixed"])
@pytest.mark.parametrize("block_size", [1 * MiB, 2 * MiB, 32 * MiB, 256 * MiB])
def test_create_512_sector_disks_pass_qemu_check_and_convert_to_what_we_wrote(tmp_path, disk_type, block_size):
    path = tmp_path / "d.vhdx"
    size = 300 * MiB + 512 * 3  # not a multiple of the block size: the last block is partial
    create(path, size, type=disk_type, block_size=block_size)
    rng = random.Random(block_size)
    model = bytearray(size)
    with vhdx.open(path, writable=True) as disk:
        for _ in range(12):
            off, n = rng.randrange(size - 300_000), rng.randrange(1, 300_000)
            data = rng.randbytes(n)
            disk.write(off, data)
            model[off : off + n] = data
        disk.write(size - 700, b"\x5a" * 700)
        model[size - 700 :] = b"\x5a" * 700
    check = qemu_img("check", path)
    assert check.returncode == 0, check.stdout + check.stderr
    qemu_img("convert", "-O", "raw", path, tmp_path / "d.raw")
    assert (tmp_path / "d.raw").read_bytes() == bytes(model)


def test_create_qemu_io_writes_to_our_disk_are_read_back(tmp_path):
    path = tmp_path / "d.vhdx"
    create(path, 64 * MiB, block_size=2 * MiB)
    with vhdx.open(path, writable=True) as disk:
        disk.write(5 * MiB, b"\x11" * 4096)
    r = subprocess.run([need("qemu-io"), "-f", "vhdx", "-c", "write -P 0x7e 10M 3M", "-c", "write -P 0x22 5M 512",
                        str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with vhdx.open(path) as disk:
        assert disk.read(10 * MiB, 3 * MiB) == b"\x7e" * (3 * MiB)
        assert disk.read(5 * MiB, 4096) == b"\x22" * 512 + b"\x11" * 3584
        assert disk.read(0, MiB) == bytes(MiB)


@pytest.mark.parametrize("block_size", [1 * MiB, 32 * MiB, 256 * MiB])
def test_create_4k_sector_disks_read_back_with_ours_and_libvhdi(tmp_path, block_size):
    from tests.support.peers import read_with_pyvhdi

    path = tmp_path / "d4k.vhdx"
    size = 80 * MiB
    create(path, size, block_size=block_size, logical_sector_size=4096)
    model = bytearray(size)
    with vhdx.open(path, writable=True) as disk:
        assert disk.logical_sector_size == 4096
        disk.write(4096 * 3 + 100, b"abc" * 1000)
        model[4096 * 3 + 100 : 4096 * 3 + 3100] = b"abc" * 1000
    with vhdx.open(path) as disk:
        assert disk.read(0, size) == bytes(model)
    assert read_with_pyvhdi([path], size) == bytes(model)


def test_create_4k_sector_disks_are_refused_by_qemu_7(tmp_path):
    # qemu-img 7.2 opens only 512-byte-sector VHDX: our 4K disks are checked with our reader and libvhdi instead.
    path = tmp_path / "d4k.vhdx"
    create(path, 16 * MiB, logical_sector_size=4096)
    r = qemu_img("info", path)
    if r.returncode == 0:
        pytest.skip("this qemu-img opens 4K-sector VHDX; the 512-byte tests cover it")
    assert "not supported" in r.stderr.lower()


def test_create_layout_is_hyperv_like_and_1mib_aligned(tmp_path):
    path = tmp_path / "d.vhdx"
    create(path, 10 * c.GiB)
    with vhdx.open(path) as disk:
        header = disk.headers.current
        assert (header.log_offset, header.log_length) == (c.MiB, c.MiB)
        assert disk.regions.metadata.file_offset == 2 * c.MiB
        assert disk.regions.bat.file_offset == 3 * c.MiB
        assert all(r.file_offset % c.MiB == 0 and r.length % c.MiB == 0 for r in disk.regions.entries)
        assert disk.block_size == 32 * MiB
        assert disk.physical_sector_size == 4096
        assert disk.bat.state_counts() == {"NOT_PRESENT": 320}


def test_create_fixed_preallocates_every_block_fully_present(tmp_path):
    path = tmp_path / "f.vhdx"
    create(path, 20 * MiB, type="fixed", block_size=8 * MiB)
    with vhdx.open(path) as disk:
        assert disk.params.leave_block_allocated
        assert disk.bat.state_counts() == {"FULLY_PRESENT": 3}
        assert os.path.getsize(path) >= int(disk.bat.offsets.max()) + 8 * MiB


def test_create_child_inherits_size_sectors_and_disk_id_and_links_to_parent(tmp_path):
    parent = tmp_path / "base.vhdx"
    create(parent, 48 * MiB, logical_sector_size=4096, physical_sector_size=512)
    child = tmp_path / "snap.avhdx"
    create(child, parent=parent)
    with vhdx.open(child) as disk, vhdx.open(parent) as base:
        assert disk.disk_type == vhdx.DiskType.DIFFERENCING
        assert (disk.virtual_size, disk.logical_sector_size, disk.physical_sector_size) == (48 * MiB, 4096, 512)
        assert disk.disk_id == base.disk_id
        assert disk.params.parent_locator.linkages == (base.data_write_guid,)
        assert disk.params.parent_locator.get("relative_path") == ".\\base.vhdx"
        assert disk.block_size == 2 * MiB


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 1000}, "multiple of the logical sector size"),
    ({"size": 64 * MiB, "block_size": 3 * MiB}, "power of two"),
    ({"size": 64 * MiB, "block_size": 512 * MiB}, "power of two"),
    ({"size": (64 << 40) + 512}, "64 TiB"),
    ({"size": 64 * MiB, "logical_sector_size": 1024}, "512 or 4096"),
    ({"size": 0}, "positive"),
])
def test_create_invalid_request_fails_before_any_file_exists(tmp_path, kwargs, message):
    path = tmp_path / "bad.vhdx"
    with pytest.raises(InvalidRequestError, match=message):
        create(path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_create_child_with_other_sector_size_than_parent_is_refused(tmp_path):
    parent = tmp_path / "p.vhdx"
    create(parent, 16 * MiB, logical_sector_size=512)
    with pytest.raises(InvalidRequestError, match="512-byte logical sectors"):
        create(tmp_path / "c.avhdx", parent=parent, logical_sector_size=4096)
    assert not (tmp_path / "c.avhdx").exists()


def test_create_never_overwrites_without_force(tmp_path):
    path = tmp_path / "d.vhdx"
    path.write_bytes(b"precious")
    with pytest.raises(InvalidRequestError, match="exists"):
        create(path, 16 * MiB)
    assert path.read_bytes() == b"precious"
    create(path, 16 * MiB, overwrite=True)
    with vhdx.open(path) as disk:
        assert disk.virtual_size == 16 * MiB
