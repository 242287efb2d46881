"""resize --to-minimum: shrinks to the end of the last MBR or GPT partition (partitions made by sfdisk), keeps
their bytes, and leaves a GPT that sgdisk verifies (its backup copy rewritten at the new end)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import vhdx
from vhdx.errors import InvalidRequestError
from vhdx.ops.convert import import_raw
from vhdx.ops.export import export_raw
from vhdx.ops.partitions import read_partition_table
from vhdx.ops.resize import resize_image

MiB = 1 << 20


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(f"/usr/sbin/{name}") or shutil.which(f"/sbin/{name}")
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install fdisk gdisk)")
    return path


def partitioned_disk(tmp_path, label: str, layout: str, size=64 * MiB) -> str:
    raw = tmp_path / "guest.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    subprocess.run([tool("sfdisk"), "-q", str(raw)], input=f"label: {label}\n{layout}".encode(), check=True,
                   capture_output=True)
    with open(raw, "r+b") as f:  # data at the start and at the last sector of the last partition
        f.seek(2 * MiB)
        f.write(b"first" * 1000)
        f.seek(30 * MiB - 512)
        f.write(b"L" * 512)
    path = str(tmp_path / "guest.vhdx")
    import_raw(raw, path, block_size=MiB)
    return path


def read(path, start, length) -> bytes:
    with vhdx.open(path) as disk:
        return disk.read(start, length)


def test_to_minimum_mbr_ends_at_the_last_partition(tmp_path):
    path = partitioned_disk(tmp_path, "dos", "start=2048, size=20480\nstart=22528, size=38912\n")
    result = resize_image(path, to_minimum=True)
    assert result.new_size == (22528 + 38912) * 512 == 30 * MiB
    assert read(path, 2 * MiB, 5000) == b"first" * 1000
    assert read(path, 30 * MiB - 512, 512) == b"L" * 512
    assert not result.gpt_backup_moved


def test_to_minimum_gpt_keeps_room_for_the_backup_and_sgdisk_verifies_it(tmp_path):
    sgdisk = tool("sgdisk")
    path = partitioned_disk(tmp_path, "gpt", "start=2048, size=20480\nstart=22528, size=38912\n")
    with vhdx.open(path) as disk:
        assert read_partition_table(disk).kind == "gpt"
    result = resize_image(path, to_minimum=True)
    assert result.new_size == 30 * MiB + 33 * 512 and result.gpt_backup_moved
    assert read(path, 30 * MiB - 512, 512) == b"L" * 512
    raw = tmp_path / "after.raw"
    with vhdx.open(path) as disk:
        export_raw(disk, raw)
    out = subprocess.run([sgdisk, "-v", str(raw)], capture_output=True, text=True)
    assert "No problems found" in out.stdout, out.stdout


def test_growing_a_gpt_disk_moves_its_backup_to_the_new_end(tmp_path):
    sgdisk = tool("sgdisk")
    path = partitioned_disk(tmp_path, "gpt", "start=2048, size=20480\n")
    resize_image(path, 128 * MiB)
    raw = tmp_path / "after.raw"
    with vhdx.open(path) as disk:
        export_raw(disk, raw)
    out = subprocess.run([sgdisk, "-v", str(raw)], capture_output=True, text=True)
    assert "No problems found" in out.stdout, out.stdout


def test_to_minimum_needs_a_partition_table(tmp_path):
    path = str(tmp_path / "blank.vhdx")
    vhdx.create_image(path, 8 * MiB, block_size=MiB)
    with pytest.raises(InvalidRequestError, match="needs a partition table"):
        resize_image(path, to_minimum=True)


def test_to_minimum_refuses_data_between_the_last_partition_and_the_end(tmp_path):
    path = partitioned_disk(tmp_path, "dos", "start=2048, size=59392\n")  # ends at 30 MiB
    with vhdx.open(path, writable=True) as disk:
        disk.write(40 * MiB, b"stray")
    with pytest.raises(InvalidRequestError, match="5 bytes that are not zero .* offset 41943040"):
        resize_image(path, to_minimum=True)


def test_a_disk_shrunk_below_two_sectors_has_no_gpt_to_move(tmp_path):
    path = str(tmp_path / "tiny.vhdx")
    vhdx.create_image(path, 8 * MiB, block_size=MiB)
    assert not resize_image(path, 512).gpt_backup_moved
