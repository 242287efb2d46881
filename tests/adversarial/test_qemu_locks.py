"""Item 5 of issue 12: our writer locks and QEMU's image locks see each other, both ways."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
from click.testing import CliRunner

import vhdx
from tests.support.peers import need
from vhdx_cli.main import cli


def _disk(tmp_path):
    path = tmp_path / "d.vhdx"
    vhdx.create_image(path, 8 << 20, logical_sector_size=512)  # qemu only opens 512-byte-sector VHDX
    return path


class QemuIo:
    """An interactive qemu-io holding a disk open until closed."""

    def __init__(self, path, *, read_only: bool = False) -> None:
        argv = [need("qemu-io"), "-f", "vhdx", *(["-r"] if read_only else []), str(path)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        # The answer to a read proves the image is open (and locked) before the test goes on.
        self.proc.stdin.write("read 0 512\n")
        self.proc.stdin.flush()
        line = ""
        while "read 512/512" not in line:
            line = self.proc.stdout.readline()
            assert line, "qemu-io exited before opening the disk"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)

    def __enter__(self) -> QemuIo:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def test_write_is_refused_while_qemu_io_has_the_disk_open_for_writing(tmp_path):
    disk = _disk(tmp_path)
    with QemuIo(disk):
        before = hashlib.sha256(disk.read_bytes()).hexdigest()
        result = CliRunner().invoke(cli, ["write", str(disk), "--offset", "0", "--pattern", "1", "--length", "4K"])
        assert result.exit_code == 1
        assert "in use by another process" in result.output
        assert "Traceback" not in result.output
        assert hashlib.sha256(disk.read_bytes()).hexdigest() == before


def test_write_is_refused_while_a_read_only_qemu_io_forbids_writers(tmp_path):
    disk = _disk(tmp_path)
    with QemuIo(disk, read_only=True), pytest.raises(vhdx.LockedError, match="in use by another process"):
        vhdx.open(disk, writable=True)


def test_qemu_io_refuses_a_disk_we_hold_open_for_writing(tmp_path):
    disk = _disk(tmp_path)
    qemu_io = need("qemu-io")
    with vhdx.open(disk, writable=True):
        for extra in ([], ["-r"]):
            done = subprocess.run([qemu_io, "-f", "vhdx", *extra, "-c", "read 0 512", str(disk)],
                                  capture_output=True, text=True, timeout=30)
            assert done.returncode != 0
            assert "lock" in done.stderr
    done = subprocess.run([qemu_io, "-f", "vhdx", "-c", "read 0 512", str(disk)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr


def test_read_commands_warn_while_qemu_io_writes(tmp_path):
    disk = _disk(tmp_path)
    with QemuIo(disk):
        result = CliRunner().invoke(cli, ["info", str(disk)])
        assert result.exit_code == 0
        assert "open for writing by another process" in result.output
    result = CliRunner().invoke(cli, ["info", str(disk)])
    assert "open for writing" not in result.output
