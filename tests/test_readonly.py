"""Read-only commands never touch evidence: info, chain, map, check and convert open their inputs O_RDONLY and
leave bytes and mtime as they were, a dirty log included (it is replayed in memory only).

Every ``os.open`` and built-in ``open`` of an input during the command is recorded; the access mode of each
must be read-only. (Tests run as root, where ``chmod 0444`` would prove nothing.)
"""

from __future__ import annotations

import builtins
import hashlib
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_check import make_child, make_dynamic

from vhdx_cli.main import cli

DIRTY_LOG = "qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2"


class OpenRecorder:
    """Records the flags of every open of the watched files."""

    def __init__(self, monkeypatch, watched: list[Path]) -> None:
        self.watched = {os.path.realpath(p) for p in watched}
        self.opens: list[tuple[str, str]] = []
        real_os_open, real_open = os.open, builtins.open

        def os_open(path, flags, *args, **kwargs):
            if isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)) in self.watched:
                self.opens.append((os.fsdecode(path), "rdonly" if flags & os.O_ACCMODE == os.O_RDONLY else "WRITE"))
            return real_os_open(path, flags, *args, **kwargs)

        def builtin_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(file)) in self.watched:
                writes = any(ch in mode for ch in "wax+")
                self.opens.append((os.fsdecode(file), "WRITE" if writes else "rdonly"))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", builtin_open)


def fingerprint(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest(), os.stat(path).st_mtime_ns


def commands(top: Path, out: Path) -> list[list[str]]:
    return [
        ["info", str(top)],
        ["info", "--json", str(top)],
        ["chain", str(top)],
        ["map", str(top)],
        ["check", str(top)],
        ["check", "--chain", "--json", str(top)],
        ["convert", str(top), str(out / "flat.raw")],
        ["convert", "-O", "vhdx", str(top), str(out / "flat.vhdx")],
    ]


def run_all_readonly(monkeypatch, top: Path, inputs: list[Path], out: Path) -> list[tuple[str, str]]:
    before = {p: fingerprint(p) for p in inputs}
    recorder = OpenRecorder(monkeypatch, inputs)
    runner = CliRunner()
    for args in commands(top, out):
        result = runner.invoke(cli, args)
        assert result.exit_code in (0, 2, 3), (args, result.output)
        assert "Traceback" not in result.output
        for name in ("flat.raw", "flat.vhdx"):
            (out / name).unlink(missing_ok=True)
    monkeypatch.undo()
    assert {p: fingerprint(p) for p in inputs} == before
    assert recorder.opens, "no open of the inputs was seen"
    return recorder.opens


@pytest.fixture
def outdir(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def test_readonly_commands_on_dynamic_disk(tmp_path, outdir, monkeypatch):
    disk = make_dynamic(tmp_path / "disk.vhdx")
    opens = run_all_readonly(monkeypatch, disk, [disk], outdir)
    assert {mode for _, mode in opens} == {"rdonly"}


def test_readonly_commands_on_differencing_chain(tmp_path, outdir, monkeypatch):
    base = make_dynamic(tmp_path / "base.vhdx")
    child = make_child(base, tmp_path / "child.avhdx")
    opens = run_all_readonly(monkeypatch, child, [base, child], outdir)
    assert {mode for _, mode in opens} == {"rdonly"}
    assert {os.path.basename(p) for p, _ in opens} == {"base.vhdx", "child.avhdx"}


def test_readonly_commands_on_dirty_log_image(corpus_image, tmp_path, outdir, monkeypatch):
    disk = tmp_path / "dirty.vhdx"
    shutil.copyfile(corpus_image(DIRTY_LOG), disk)
    os.utime(disk, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    opens = run_all_readonly(monkeypatch, disk, [disk], outdir)
    assert {mode for _, mode in opens} == {"rdonly"}


def test_readonly_descriptors_are_read_only_while_open(tmp_path):
    """The descriptor a read-only open holds is O_RDONLY in /proc/self/fdinfo (Linux)."""
    import vhdx

    disk = make_dynamic(tmp_path / "disk.vhdx")
    if not os.path.isdir("/proc/self/fdinfo"):
        pytest.skip("no /proc/self/fdinfo on this system")
    with vhdx.open(disk) as image, open(f"/proc/self/fdinfo/{image.io.fd}") as f:
        flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
    assert flags & os.O_ACCMODE == os.O_RDONLY
