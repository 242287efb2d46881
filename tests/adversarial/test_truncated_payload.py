"""Truncated payload (issue 12, item 9): data the file lacks is an error, never silent zeros.

One rule (``vhdx.structures.bat.payload_missing_bytes``, QEMU's): only the part of the last block past the
virtual disk's end may be missing. ``check`` reports anything else as ``BAT_BEYOND_EOF`` (exit 2); readers refuse the
file (``hash``, ``convert``, ``diff``, ``serve`` exit 1); ``--salvage`` reads the missing bytes as zeros and lists
every virtual range it invented.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import vhdx
from vhdx.errors import FormatError
from vhdx.forensics.nbd import nbdkit_command
from vhdx.ops.check import check_image
from vhdx.ops.create import create
from vhdx_cli.main import cli

MiB = 1 << 20
BLOCK = MiB


def _disk(path: Path, size: int) -> tuple[Path, int, bytes]:
    """A dynamic disk whose last block, written last, sits at the end of the file; returns its file offset."""
    create(path, size, block_size=BLOCK, logical_sector_size=512)
    last = (size - 1) // BLOCK
    data = bytes((i * 7) & 0xFF for i in range(size - last * BLOCK))
    with vhdx.open(path, writable=True) as image:
        image.write(0, b"\x11" * 4096)
        image.write(last * BLOCK, data)
    with vhdx.open(path) as image:
        offset = int(image.bat.offsets[last])
    return path, offset, data


@pytest.fixture
def cut(tmp_path) -> tuple[Path, int]:
    """8 MiB disk whose last block lost its second half (virtual 0x780000..0x800000)."""
    path, offset, _ = _disk(tmp_path / "cut.vhdx", 8 * MiB)
    os.truncate(path, offset + BLOCK // 2)
    return path, offset


def test_check_reports_a_last_block_cut_inside_the_virtual_disk(cut):
    path, offset = cut
    report = check_image(path)
    assert report.exit_code == 2
    beyond = report.find("BAT_BEYOND_EOF")
    assert len(beyond) == 1 and f"{offset:#x}" in beyond[0].message and not beyond[0].repairable


def test_open_refuses_a_last_block_cut_inside_the_virtual_disk(cut):
    path, _ = cut
    with pytest.raises(FormatError, match="beyond the end of the file") as info:
        vhdx.open(path)
    assert "BAT entry" in str(info.value) and info.value.hint == "salvage"


def test_a_block_missing_only_past_the_virtual_disk_end_is_accepted(tmp_path):
    # 7.5 MiB disk: the last block holds 0.5 MiB of the disk; the file may end right after it (QEMU's rule).
    path, offset, data = _disk(tmp_path / "short.vhdx", 7 * MiB + MiB // 2)
    os.truncate(path, offset + MiB // 2)
    assert not check_image(path).find("BAT_BEYOND_EOF")
    with vhdx.open(path) as image:
        assert image.read(7 * MiB, MiB // 2) == data


def test_a_block_missing_one_byte_of_the_virtual_disk_is_refused(tmp_path):
    path, offset, _ = _disk(tmp_path / "short.vhdx", 7 * MiB + MiB // 2)
    os.truncate(path, offset + MiB // 2 - 512)
    assert check_image(path).find("BAT_BEYOND_EOF")
    with pytest.raises(FormatError):
        vhdx.open(path)


@pytest.mark.parametrize("command", [["hash"], ["convert", "{out}", "-O", "raw"], ["diff"]])
def test_read_commands_refuse_truncated_payload(cut, tmp_path, command):
    path, _ = cut
    args = [a.format(out=tmp_path / "out.raw") for a in command]
    result = CliRunner().invoke(cli, [args[0], str(path), *args[1:]])
    assert result.exit_code == 1
    assert "beyond the end of the file" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.raw").exists()


def test_serve_refuses_truncated_payload_before_starting(cut, tmp_path):
    path, _ = cut
    result = CliRunner().invoke(cli, ["serve", str(path), "--unix", str(tmp_path / "nbd.sock")])
    assert result.exit_code == 1 and "beyond the end of the file" in result.output


def test_salvage_reads_zeros_and_lists_the_invented_range(cut, tmp_path):
    path, _ = cut
    out = tmp_path / "out.raw"
    result = CliRunner().invoke(cli, ["convert", str(path), str(out), "-O", "raw", "--salvage"])
    assert result.exit_code == 0, result.output
    assert "salvage" in result.output and "virtual 0x780000 length 0x80000" in result.output
    raw = out.read_bytes()
    assert raw[:4096] == b"\x11" * 4096
    assert raw[7 * MiB + BLOCK // 2 :] == bytes(BLOCK // 2)
    with vhdx.open(path, salvage=True) as image:
        assert image.invented == ((7 * MiB + BLOCK // 2, BLOCK // 2),)


@pytest.mark.parametrize("command", [["hash"], ["diff"]])
def test_salvage_on_hash_and_diff_lists_the_invented_range(cut, command):
    path, _ = cut
    result = CliRunner().invoke(cli, [*command, str(path), "--salvage"])
    assert result.exit_code == 0, result.output
    assert "virtual 0x780000 length 0x80000" in result.output


def test_serve_passes_salvage_to_the_nbdkit_plugin(cut):
    path, _ = cut
    assert "salvage=1" in nbdkit_command("nbdkit", str(path), salvage=True)
    assert "salvage=1" not in nbdkit_command("nbdkit", str(path))


def test_salvage_is_refused_for_writable_opens(cut):
    path, _ = cut
    with pytest.raises(vhdx.InvalidRequestError, match="salvage"):
        vhdx.open(path, writable=True, salvage=True)
