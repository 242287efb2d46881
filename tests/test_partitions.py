"""Partitions of the virtual disk (MBR with logical partitions, GPT), checked against sfdisk's own reading."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest
from click.testing import CliRunner

import vhdx
from tests.forensics.test_export import fuse_usable, nbdkit_ready, stop, vhdx_cmd, wait_for  # noqa: F401
from vhdx.errors import FormatError
from vhdx.forensics import nbd
from vhdx.ops.convert import import_raw
from vhdx.ops.partitions import PartitionView, image_partitions, read_partitions, select
from vhdx_cli.json_schemas import SCHEMAS
from vhdx_cli.main import cli

MiB = 1 << 20
SIZE = 64 * MiB


def sfdisk(raw, script: str) -> dict:
    tool = shutil.which("sfdisk") or pytest.skip("sfdisk is not installed (Debian: apt-get install fdisk)")
    subprocess.run([tool, "-q", str(raw)], input=script, text=True, check=True, capture_output=True)
    return json.loads(subprocess.run([tool, "--json", str(raw)], text=True, check=True,
                                     capture_output=True).stdout)["partitiontable"]


def disk_with(tmp_path, script: str):
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(SIZE)
    table = sfdisk(raw, script)
    with open(raw, "r+b") as f:  # a marker at the start of each partition, so hashes differ
        for i, p in enumerate(table["partitions"]):
            if p["type"] == "5":
                continue  # an extended partition starts with its EBR
            f.seek(p["start"] * 512)
            f.write(bytes([0x40 + i]) * 4096)
    path = tmp_path / "disk.vhdx"
    import_raw(str(raw), str(path), block_size=MiB)
    return raw, path, table


MBR_SCRIPT = "label: dos\n,8M,83,*\n,8M,7\n,,5\n,10M,83\n,10M,82\n"
GPT_SCRIPT = ('label: gpt\nsize=8M, type=U, name="EFI"\nsize=16M, type=L, name="root"\n'
              'size=8M, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name="swap"\n')


def test_mbr_partitions_match_sfdisk_including_logical_ones(tmp_path):
    _, path, table = disk_with(tmp_path, MBR_SCRIPT)
    with vhdx.open(path) as image:
        parts = read_partitions(image.read, image.virtual_size, 512)
    expected = [(int(p["node"].rsplit("raw", 1)[1]), p["start"] * 512, p["size"] * 512, int(p["type"], 16))
                for p in table["partitions"]]
    assert [(p.number, p.start, p.length, int(p.type, 16)) for p in parts] == expected
    assert [p.bootable for p in parts][:2] == [True, False]
    assert [p.number for p in parts] == [1, 2, 3, 5, 6]


def test_gpt_partitions_match_sfdisk_with_names_and_guids(tmp_path):
    _, path, table = disk_with(tmp_path, GPT_SCRIPT)
    with vhdx.open(path) as image:
        parts = read_partitions(image.read, image.virtual_size, 512)
    assert [(p.start, p.length, p.type.upper(), p.guid.upper(), p.name) for p in parts] == [
        (p["start"] * 512, p["size"] * 512, p["type"], p["uuid"], p["name"]) for p in table["partitions"]]


def test_gpt_falls_back_to_the_backup_header_when_the_primary_is_damaged(tmp_path):
    raw, _, table = disk_with(tmp_path, GPT_SCRIPT)
    data = bytearray(raw.read_bytes())
    data[512 + 20] ^= 0xFF  # inside the primary header: its CRC no longer matches
    parts = read_partitions(lambda o, n: bytes(data[o:o + n]), len(data), 512)
    assert [p.start for p in parts] == [p["start"] * 512 for p in table["partitions"]]


def test_gpt_with_both_headers_damaged_is_a_format_error_naming_the_header(tmp_path):
    raw, _, _ = disk_with(tmp_path, GPT_SCRIPT)
    data = bytearray(raw.read_bytes())
    data[512 + 20] ^= 0xFF
    data[len(data) - 512 + 20] ^= 0xFF
    with pytest.raises(FormatError, match="GPT header"):
        read_partitions(lambda o, n: bytes(data[o:o + n]), len(data), 512)


def test_a_looping_ebr_chain_ends(tmp_path):
    raw, _, table = disk_with(tmp_path, MBR_SCRIPT)
    data = bytearray(raw.read_bytes())
    ext = next(p for p in table["partitions"] if p["type"] == "5")["start"]
    last_ebr = table["partitions"][-1]["start"] - 2048  # sfdisk puts each EBR 1 MiB before its logical partition
    link = last_ebr * 512 + 446 + 16  # the last EBR's "next EBR" entry now points back at the first EBR
    data[link + 4] = 0x05
    data[link + 8:link + 12] = (1).to_bytes(4, "little")
    data[link + 12:link + 16] = (1).to_bytes(4, "little")
    data[ext * 512 + 446 + 16 + 8:ext * 512 + 446 + 16 + 12] = (last_ebr - ext).to_bytes(4, "little")
    data[(ext + 1) * 512:(ext + 2) * 512] = data[ext * 512:(ext + 1) * 512]  # EBR at ext+1 links to the last again
    parts = read_partitions(lambda o, n: bytes(data[o:o + n]), len(data), 512)
    assert [p.number for p in parts][:5] == [1, 2, 3, 5, 6]
    assert len(parts) < 3 + 128


def test_a_partition_past_the_disk_end_is_a_format_error(tmp_path):
    data = bytearray(SIZE)
    data[446 + 4] = 0x83
    data[446 + 8:446 + 12] = (2048).to_bytes(4, "little")
    data[446 + 12:446 + 16] = (SIZE // 512).to_bytes(4, "little")
    data[510:512] = b"\x55\xaa"
    with pytest.raises(FormatError, match="outside"):
        read_partitions(lambda o, n: bytes(data[o:o + n]), len(data), 512)


def test_a_disk_without_a_partition_table_has_no_partitions(tmp_path):
    path = tmp_path / "blank.vhdx"
    vhdx.create_image(path, 8 * MiB, block_size=MiB)
    result = CliRunner().invoke(cli, ["partitions", str(path)])
    assert result.exit_code == 0 and "no MBR or GPT" in result.output


def test_cli_partitions_json(tmp_path):
    _, path, table = disk_with(tmp_path, GPT_SCRIPT)
    result = CliRunner().invoke(cli, ["partitions", "--json", str(path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a test dependency")
    jsonschema.validate(data, SCHEMAS["partitions"])
    assert data["scheme"] == "gpt" and [p["name"] for p in data["partitions"]] == ["EFI", "root", "swap"]


def test_hash_partition_equals_the_hash_of_that_slice(tmp_path):
    raw, path, table = disk_with(tmp_path, MBR_SCRIPT)
    p = table["partitions"][3]  # logical partition 5
    start, length = p["start"] * 512, p["size"] * 512
    expected = hashlib.sha256(raw.read_bytes()[start:start + length]).hexdigest()
    result = CliRunner().invoke(cli, ["hash", "--partition", "5", str(path)])
    assert result.exit_code == 0, result.output
    assert expected in result.output


def test_hash_of_a_missing_partition_names_those_there_are(tmp_path):
    _, path, _ = disk_with(tmp_path, GPT_SCRIPT)
    result = CliRunner().invoke(cli, ["hash", "--partition", "9", str(path)])
    assert result.exit_code == 1 and "partitions: 1, 2, 3" in result.output


def test_partition_view_reads_and_maps_the_partition_alone(tmp_path):
    raw, path, table = disk_with(tmp_path, GPT_SCRIPT)
    p = table["partitions"][1]
    start, length = p["start"] * 512, p["size"] * 512
    with vhdx.open(path) as image:
        view = PartitionView(image, select(image_partitions(image), 2))
        assert view.virtual_size == length
        assert view.read(0, length) == raw.read_bytes()[start:start + length]
        assert view.read(length - 10, 100) == raw.read_bytes()[start + length - 10:start + length]
        ext = view.extents()
        assert int(ext.start[0]) == 0 and int(ext.length.sum()) == length


def test_nbd_plugin_exports_one_partition(tmp_path):
    raw, path, table = disk_with(tmp_path, MBR_SCRIPT)
    p = table["partitions"][4]  # logical partition 6
    start, length = p["start"] * 512, p["size"] * 512
    nbd._config.update({"file": str(path), "at": 0, "partition": 6})
    try:
        handle = nbd.open(True)
        try:
            assert nbd.get_size(handle) == length
            buf = bytearray(4096)
            nbd.pread(handle, buf, 0, 0)
            assert bytes(buf) == raw.read_bytes()[start:start + 4096]
        finally:
            nbd.close(handle)
    finally:
        nbd._config.pop("file")
        nbd._config.pop("partition")


@pytest.mark.usefixtures("nbdkit_ready")
def test_serve_partition_over_nbd_matches_the_slice(tmp_path):
    raw, path, table = disk_with(tmp_path, GPT_SCRIPT)
    p = table["partitions"][2]
    start, length = p["start"] * 512, p["size"] * 512
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(vhdx_cmd("serve", path, "--partition", 3, "--unix", sock), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(sock.exists, proc)
        out = tmp_path / "p3.raw"
        done = subprocess.run(["qemu-img", "convert", "-f", "raw", f"nbd+unix:///?socket={sock}", "-O", "raw",
                               str(out)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == raw.read_bytes()[start:start + length]
    finally:
        stop(proc)


@pytest.mark.usefixtures("nbdkit_ready")
def test_serve_a_missing_partition_is_a_clear_error(tmp_path):
    _, path, _ = disk_with(tmp_path, GPT_SCRIPT)
    result = CliRunner().invoke(cli, ["serve", str(path), "--partition", "7", "--unix", str(tmp_path / "s")])
    assert result.exit_code == 1 and "no partition 7" in result.output


def test_mount_partition_exposes_the_slice(tmp_path):
    reason = fuse_usable()
    if reason:
        pytest.skip(reason)
    raw, path, table = disk_with(tmp_path, MBR_SCRIPT)
    p = table["partitions"][0]
    start, length = p["start"] * 512, p["size"] * 512
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(vhdx_cmd("mount", path, mnt, "--partition", 1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    exposed = mnt / "disk-p1.raw"
    try:
        wait_for(exposed.exists, proc)
        assert exposed.read_bytes() == raw.read_bytes()[start:start + length]
    finally:
        if proc.poll() is None:
            umount = shutil.which("fusermount3") or shutil.which("fusermount")
            subprocess.run([umount, "-u", str(mnt)] if umount else ["umount", str(mnt)], capture_output=True)
        code = proc.wait(timeout=20)
    stderr = proc.communicate()[1]
    if code != 0 and "cannot mount" in stderr:
        pytest.skip(stderr.strip())
    assert code == 0, stderr
