"""Item 12 of issue 12 (all but the merge ENOSPC hint): odd inputs end in one clear line, never a traceback."""

from __future__ import annotations

import os
import stat

import pytest
from click.testing import CliRunner

import vhdx
from vhdx_cli.main import cli

MiB = 1 << 20


def one_line(*args):
    result = CliRunner().invoke(cli, [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vhdx: error: "), result.output
    return lines[0]


@pytest.fixture
def non_utf8_parent(tmp_path):
    path = os.path.join(os.fsencode(tmp_path), b"parent-\xff.vhdx")
    try:
        vhdx.create(os.fsdecode(path), 4 * MiB)
    except vhdx.VhdxError as exc:
        pytest.skip(f"this file system refuses non-UTF-8 names: {exc}")
    return path


def test_create_with_a_non_utf8_parent_name_is_one_line(non_utf8_parent, tmp_path):
    line = one_line("create", tmp_path / "child.avhdx", "--parent", non_utf8_parent)
    assert "not valid UTF-8" in line
    assert not (tmp_path / "child.avhdx").exists()


def test_set_parent_to_a_non_utf8_parent_name_is_one_line(non_utf8_parent, tmp_path):
    base, child = tmp_path / "base.vhdx", tmp_path / "child.avhdx"
    vhdx.create(base, 4 * MiB)
    vhdx.create(child, parent=base)
    before = child.read_bytes()
    line = one_line("set-parent", "--ignore-id-mismatch", child, non_utf8_parent)
    assert "not valid UTF-8" in line
    assert child.read_bytes() == before


@pytest.mark.parametrize("auth", ["basic", "certificate"])
def test_psrp_auth_that_cannot_be_encrypted_over_http_is_one_line(auth):
    line = one_line("hyperv", "--host", "192.0.2.1", "--user", "u", "--password", "p", "--no-ssl", "--auth", auth,
                    "vms")
    assert f"--auth {auth} needs --ssl" in line


def test_memory_error_is_one_line(tmp_path, monkeypatch):
    disk = tmp_path / "d.vhdx"
    vhdx.create(disk, 4 * MiB)

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr("vhdx_cli.read_cmds.describe_image", exhausted)
    assert "out of memory" in one_line("info", disk)


def test_a_full_disk_error_names_the_file(tmp_path):
    disk = tmp_path / "d.vhdx"
    vhdx.create(disk, 4 * MiB)
    full = tmp_path / "full"
    try:
        os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # a /dev/full of our own: writes fail with ENOSPC
    except OSError as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    line = one_line("convert", disk, full, "-O", "raw", "--force")
    assert str(full) in line and "No space left on device" in line
    assert stat.S_ISCHR(os.lstat(full).st_mode)


def test_a_full_disk_while_building_a_vhdx_names_the_destination_and_leaves_nothing(tmp_path, monkeypatch):
    disk = tmp_path / "d.vhdx"
    vhdx.create(disk, 4 * MiB)
    with vhdx.open(disk, writable=True) as image:
        image.write(0, b"\x01" * MiB)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    out = tmp_path / "out.vhdx"
    line = one_line("convert", disk, out, "-O", "vhdx")
    assert f"{out}:" in line and "No space left on device" in line
    assert sorted(os.listdir(tmp_path)) == ["d.vhdx"]
