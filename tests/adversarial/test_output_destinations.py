"""Item 2 of issue 12: --force never replaces a device, FIFO or symlink, and temporaries cannot be hijacked."""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading

import pytest
from click.testing import CliRunner

import vhdx
from tests.test_writer import _hold_lock
from vhdx_cli.main import cli

MiB = 1 << 20


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in (result.output or "")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "d.vhdx"
    vhdx.create_image(path, 4 * MiB, block_size=MiB)
    with vhdx.open(path, writable=True) as image:
        image.write(MiB + 17, b"payload" * 1000)
    return path


def _raw_of(path) -> bytes:
    with vhdx.open(path) as image:
        return image.read(0, image.virtual_size)


def _leftovers(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith((".part", ".tmp")))


class FifoReader:
    """Reads everything written into a FIFO; a writer of our own keeps it open until ``finish``."""

    def __init__(self, path) -> None:
        os.mkfifo(path)
        self.data = bytearray()
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._keep = os.open(path, os.O_WRONLY)
        os.set_blocking(self._fd, True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while chunk := os.read(self._fd, 1 << 16):
            self.data += chunk

    def finish(self) -> bytes:
        os.close(self._keep)
        self._thread.join(30)
        os.close(self._fd)
        return bytes(self.data)


def test_raw_convert_into_a_fifo_streams_through_it_and_the_fifo_stays(disk, tmp_path):
    fifo = tmp_path / "out.fifo"
    reader = FifoReader(fifo)
    result = run("convert", disk, fifo, "-O", "raw", "--force")
    assert reader.finish() == _raw_of(disk)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert _leftovers(tmp_path) == []


def _char_device(tmp_path):
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    return node


def test_raw_convert_into_a_character_device_writes_in_place(disk, tmp_path):
    node = _char_device(tmp_path)
    result = run("convert", disk, node, "-O", "raw", "--force")
    assert result.exit_code == 0, result.output
    st = os.lstat(node)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("command", [["convert", "{disk}", "{out}", "-O", "vhdx", "--force"],
                                     ["flatten", "{disk}", "{out}", "--force"],
                                     ["create", "{out}", "--size", "4M", "--force"]])
def test_vhdx_output_into_a_device_is_refused_with_a_reason(disk, tmp_path, command):
    node = _char_device(tmp_path)
    result = run(*(arg.format(disk=disk, out=node) for arg in command))
    assert result.exit_code == 1
    assert "character device" in result.output and "regular file" in result.output
    assert stat.S_ISCHR(os.lstat(node).st_mode)
    assert _leftovers(tmp_path) == []


def test_vhdx_output_into_a_fifo_is_refused_without_blocking(disk, tmp_path):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    result = run("convert", disk, fifo, "-O", "vhdx", "--force")
    assert result.exit_code == 1 and "FIFO" in result.output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("fmt", ["raw", "vhdx"])
def test_symlinked_destination_stays_a_symlink_and_its_target_gets_the_output(disk, tmp_path, fmt):
    real = tmp_path / "elsewhere" / "real.out"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "link.out"
    link.symlink_to(real)
    result = run("convert", disk, link, "-O", fmt, "--force")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(real)
    got = real.read_bytes() if fmt == "raw" else _raw_of(real)
    assert got == _raw_of(disk)
    assert _leftovers(tmp_path) == [] and _leftovers(real.parent) == []


def test_dangling_symlink_destination_is_refused(disk, tmp_path):
    link = tmp_path / "link.raw"
    link.symlink_to(tmp_path / "missing" / "x.raw")
    result = run("convert", disk, link, "-O", "raw", "--force")
    assert result.exit_code == 1 and "symbolic link" in result.output
    assert link.is_symlink()


@pytest.mark.parametrize("command", [["convert", "{disk}", "{out}.img", "-O", "raw"],
                                     ["convert", "{disk}", "{out}.vhdx", "-O", "vhdx"],
                                     ["flatten", "{disk}", "{out}.vhdx"],
                                     ["create", "{out}.vhdx", "--size", "4M"]])
def test_planted_temporary_symlink_is_never_followed(disk, tmp_path, command):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / next(arg for arg in command if arg.startswith("{out}")).format(out="out")
    for suffix in (".part", ".tmp"):
        (tmp_path / f"{out.name}{suffix}").symlink_to(victim)
    result = run(*(arg.format(disk=disk, out=tmp_path / "out") for arg in command))
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == b"precious"
    assert out.is_file() and not out.is_symlink()


@pytest.mark.parametrize("fmt", ["raw", "vhdx"])
def test_no_temporary_is_left_when_the_final_rename_fails(disk, tmp_path, monkeypatch, fmt):
    out = tmp_path / "out.img"

    def refuse(src, dst, *a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    result = run("convert", disk, out, "-O", fmt)
    assert result.exit_code == 1
    assert "No space left on device" in result.output
    assert not out.exists() and _leftovers(tmp_path) == []


def test_create_leaves_no_temporary_when_the_final_rename_fails(tmp_path, monkeypatch):
    def refuse(src, dst, *a, **kw):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(vhdx.VhdxError, match="Permission denied"):
        vhdx.create_image(tmp_path / "new.vhdx", 4 * MiB)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", [["create", "{disk}", "--size", "4M", "--force"],
                                     ["convert", "{other}", "{disk}", "-O", "vhdx", "--force"]])
def test_force_refuses_to_replace_a_file_another_process_is_writing(disk, tmp_path, command):
    other = tmp_path / "other.vhdx"
    vhdx.create_image(other, 4 * MiB)
    before = disk.read_bytes()
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(disk), ready, release))
    proc.start()
    try:
        assert ready.wait(10)
        result = run(*(arg.format(disk=disk, other=other) for arg in command))
        assert result.exit_code == 1
        assert "in use by another process" in result.output
    finally:
        release.set()
        proc.join(10)
    assert disk.read_bytes() == before
    assert _leftovers(tmp_path) == []
