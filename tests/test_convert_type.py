"""Convert-VHD: --keep-id keeps the Virtual Disk ID; --type fixed/dynamic/--block-size read the same bytes;
--type differencing --parent P makes a child of P holding only the sectors that differ from P."""

from __future__ import annotations

import subprocess

import pytest
from click.testing import CliRunner

import vhdx
from tests.support.peers import need, read_with_pyvhdi
from vhdx.errors import InvalidRequestError
from vhdx.format import constants as c
from vhdx.ops.check import check_image
from vhdx.ops.convert import flatten
from vhdx.ops.convert_type import make_child
from vhdx.ops.create import create
from vhdx_cli.main import cli

MiB = 1 << 20


def disk_with(path, size, writes, block=MiB, sector=512):
    create(path, size, block_size=block, logical_sector_size=sector)
    with vhdx.open(path, writable=True) as disk:
        for offset, data in writes:
            disk.write(offset, data)
    return str(path)


def read_all(path) -> bytes:
    with vhdx.open(path) as disk:
        return disk.read(0, disk.virtual_size)


def disk_id(path):
    with vhdx.open(path) as disk:
        return disk.disk_id


def test_flatten_assigns_a_new_disk_id_by_default_and_keeps_it_with_keep_id(tmp_path):
    src = disk_with(tmp_path / "s.vhdx", 8 * MiB, [(0, b"a" * 4096)])
    with vhdx.open(src) as image:
        flatten(image, tmp_path / "new.vhdx")
        flatten(image, tmp_path / "kept.vhdx", type="fixed", block_size=2 * MiB, keep_id=True)
    assert disk_id(tmp_path / "new.vhdx") != disk_id(src)
    assert disk_id(tmp_path / "kept.vhdx") == disk_id(src)
    with vhdx.open(tmp_path / "kept.vhdx") as disk:
        assert (disk.disk_type, disk.block_size) == (c.DiskType.FIXED, 2 * MiB)
    assert read_all(tmp_path / "kept.vhdx") == read_all(src)


def test_differencing_child_holds_only_the_sectors_that_differ(tmp_path):
    base = disk_with(tmp_path / "base.vhdx", 8 * MiB, [(0, b"\x01" * (4 * MiB))])
    changed = b"\x01" * MiB + b"\x02" * 512 + b"\x01" * (MiB - 512)
    src = disk_with(tmp_path / "src.vhdx", 8 * MiB,
                    [(0, b"\x01" * (4 * MiB)), (MiB, changed[MiB:]), (3 * MiB, bytes(MiB)), (6 * MiB, b"\x03" * 4096)])
    with vhdx.open(src) as image:
        written = make_child(image, tmp_path / "child.avhdx", base)
    # 512 changed bytes, a zeroed MiB over parent data, 4096 new bytes past the parent's data
    assert written == 512 + MiB + 4096
    child = str(tmp_path / "child.avhdx")
    assert read_all(child) == read_all(src)
    with vhdx.open(child) as disk:
        assert disk.has_parent and disk.disk_id == disk.parent.disk_id
        assert disk.bat.states[2] == c.BatState.NOT_PRESENT  # 4-6 MiB: as the parent, nothing held
    assert check_image(child, chain=True).exit_code == 0
    assert read_with_pyvhdi([child, base], 8 * MiB) == read_all(src)


def test_differencing_child_refuses_a_parent_with_other_sectors(tmp_path):
    base = disk_with(tmp_path / "base.vhdx", 8 * MiB, [], sector=4096)
    src = disk_with(tmp_path / "src.vhdx", 8 * MiB, [])
    with vhdx.open(src) as image, pytest.raises(InvalidRequestError, match="4096-byte sectors"):
        make_child(image, tmp_path / "child.avhdx", base)


def test_cli_convert_type_differencing_and_keep_id(tmp_path):
    base = disk_with(tmp_path / "base.vhdx", 8 * MiB, [(0, b"\x05" * MiB)])
    src = disk_with(tmp_path / "src.vhdx", 8 * MiB, [(0, b"\x05" * MiB), (5 * MiB, b"\x06" * MiB)])
    child = tmp_path / "child.avhdx"
    result = CliRunner().invoke(cli, ["convert", src, str(child), "-O", "vhdx", "--type", "differencing",
                                      "--parent", base, "--keep-id"])
    assert result.exit_code == 0, result.output
    assert read_all(child) == read_all(src) and disk_id(child) == disk_id(src)
    missing = CliRunner().invoke(cli, ["convert", src, str(tmp_path / "x.avhdx"), "-O", "vhdx", "--type",
                                       "differencing"])
    assert missing.exit_code == 1 and "needs --parent" in missing.output


@pytest.mark.peer
def test_qemu_reads_a_keep_id_conversion_like_the_source(tmp_path):
    qemu_img = need("qemu-img")
    src = disk_with(tmp_path / "s.vhdx", 8 * MiB, [(MiB + 512, b"q" * 7000)])
    with vhdx.open(src) as image:
        flatten(image, tmp_path / "out.vhdx", type="fixed", keep_id=True)
    subprocess.run([qemu_img, "check", str(tmp_path / "out.vhdx")], check=True, capture_output=True)
    subprocess.run([qemu_img, "convert", "-O", "raw", str(tmp_path / "out.vhdx"), str(tmp_path / "o.raw")], check=True)
    assert (tmp_path / "o.raw").read_bytes() == read_all(src)
