"""A file in another disk format (or an empty one) is named for what it is, not called a malformed VHDX."""

from __future__ import annotations

import struct

import pytest
from click.testing import CliRunner

import vhdx
from vhdx.errors import FormatError
from vhdx_cli.main import cli

MiB = 1 << 20


def vhd_footer() -> bytes:
    return b"conectix" + bytes(504)


# name -> (bytes of the file, words the error must say). Magic numbers as their formats define them.
FOREIGN = {
    "dynamic.vhd": (vhd_footer() + bytes(MiB), "VHD (v1)"),
    "fixed.vhd": (bytes(MiB) + vhd_footer(), "VHD (v1)"),
    "fixed-511.vhd": (bytes(MiB) + vhd_footer()[:511], "VHD (v1)"),  # Virtual PC before 2004 wrote 511 bytes
    "disk.qcow2": (b"QFI\xfb\x00\x00\x00\x03" + bytes(MiB), "qcow2"),
    "disk.vmdk": (b"KDMV\x01\x00\x00\x00" + bytes(MiB), "VMDK"),
    "disk-flat.vmdk": (b"# Disk DescriptorFile\nversion=1\n" + bytes(1000), "VMDK"),
    "disk.vdi": (b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(0x40, b"\0") + struct.pack("<I", 0xBEDA107F)
                 + bytes(MiB), "VDI"),
    "disk.qed": (b"QED\x00" + bytes(MiB), "QED"),
}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_info_names_the_other_disk_format_and_exits_1(tmp_path, name):
    content, words = FOREIGN[name]
    path = tmp_path / "evidence.img"  # a neutral name: the message must come from the bytes
    path.write_bytes(content)
    result = run("info", path)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert words in lines[0] and "not VHDX" in lines[0], lines[0]


def test_info_on_an_empty_file_says_empty_file(tmp_path):
    path = tmp_path / "blank.vhdx"
    path.write_bytes(b"")
    result = run("info", path)
    assert result.exit_code == 1
    assert "empty file" in result.output, result.output


def test_library_open_of_a_vhd_raises_format_error_naming_vhd(tmp_path):
    path = tmp_path / "old.vhd"
    path.write_bytes(vhd_footer() + bytes(MiB))
    with pytest.raises(FormatError, match=r"VHD \(v1\)"):
        vhdx.open(path)


def test_random_bytes_still_say_not_a_vhdx_signature(tmp_path):
    path = tmp_path / "noise.bin"
    path.write_bytes(b"\x01\x02\x03\x04" * 1000)
    result = run("info", path)
    assert result.exit_code == 1
    assert "vhdxfile" in result.output


def test_check_names_the_other_format_too(tmp_path):
    path = tmp_path / "evidence.img"
    path.write_bytes(FOREIGN["disk.qcow2"][0])
    result = run("check", path)
    assert result.exit_code == 1
    assert "qcow2" in result.output, result.output
