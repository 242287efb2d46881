"""Flags as qemu-img users expect them: -f is the input format, --force is long-only, -v/-p/-q anywhere."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

import vhdx
from vhdx_cli.main import cli

MiB = 1 << 20


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in (result.output or "")
    return result


@pytest.fixture()
def disk(tmp_path):
    path = tmp_path / "d.vhdx"
    vhdx.create_image(path, 4 * MiB, block_size=MiB)
    with vhdx.open(path, writable=True) as image:
        image.write(MiB, b"\x5a" * MiB)
    return path


def test_create_has_no_short_f_flag(tmp_path):
    result = run("create", tmp_path / "a.vhdx", "--size", "4M", "-f")
    assert result.exit_code == 1
    assert "-f" in result.output


def test_create_force_long_flag_still_overwrites(tmp_path, disk):
    assert run("create", disk, "--size", "8M", "--force").exit_code == 0
    with vhdx.open(disk) as image:
        assert image.virtual_size == 8 * MiB


def test_convert_short_f_is_the_input_format(tmp_path, disk):
    raw = tmp_path / "in.raw"
    raw.write_bytes(b"\x11" * MiB)
    assert run("convert", "-f", "raw", "-O", "vhdx", raw, tmp_path / "o.vhdx").exit_code == 0


@pytest.mark.parametrize("flag", ["-v", "--verbose", "-p", "--progress", "-q", "--quiet"])
def test_global_flags_are_accepted_after_the_command(disk, flag):
    assert run("info", disk, flag).exit_code == 0
    assert run(flag, "info", disk).exit_code == 0


def test_progress_flag_forces_progress_into_a_log(tmp_path, disk):
    result = run("convert", "-p", disk, tmp_path / "o.raw")
    assert result.exit_code == 0
    assert "convert: 100%" in result.stderr


def test_progress_stays_off_without_a_terminal_or_the_flag(tmp_path, disk):
    assert "%" not in run("convert", disk, tmp_path / "o.raw").stderr


def test_quiet_wins_over_progress_and_hides_warnings(tmp_path, disk):
    result = run("-p", "convert", "--quiet", disk, tmp_path / "o.raw")
    assert result.exit_code == 0
    assert result.stderr == ""


def test_convert_to_dash_writes_the_raw_disk_to_stdout(disk, tmp_path):
    done = subprocess.run([sys.executable, "-m", "vhdx_cli.main", "convert", str(disk), "-"], capture_output=True,
                          timeout=120, cwd=tmp_path)  # a tool that took "-" for a file name writes it there
    assert not (tmp_path / "-").exists()
    assert done.returncode == 0, done.stderr
    with vhdx.open(disk) as image:
        assert hashlib.sha256(done.stdout).hexdigest() == hashlib.sha256(image.read(0, image.virtual_size)).hexdigest()


def test_convert_to_dash_refuses_vhdx_output(disk, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("convert", disk, "-", "-O", "vhdx")
    assert result.exit_code == 1 and "stdout" in result.output


@pytest.mark.parametrize("name", ["disk.vhd", "disk.qcow2", "disk.vmdk", "DISK.VHD"])
def test_create_refuses_an_extension_it_will_not_honour(tmp_path, name):
    result = run("create", tmp_path / name, "--size", "4M")
    assert result.exit_code == 1
    assert "VHDX" in result.output and "--force" in result.output
    assert not (tmp_path / name).exists()


def test_create_writes_a_vhdx_under_another_extension_with_force(tmp_path):
    assert run("create", tmp_path / "disk.vhd", "--size", "4M", "--force").exit_code == 0
    with vhdx.open(tmp_path / "disk.vhd") as image:
        assert image.virtual_size == 4 * MiB


@pytest.mark.parametrize("name", ["disk.vhdx", "snap.avhdx", "disk.VHDX", "disk"])
def test_create_accepts_vhdx_names(tmp_path, name):
    assert run("create", tmp_path / name, "--size", "4M").exit_code == 0


def test_fixture_build_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = run("fixture", "build", "differencing-depth-1", tmp_path)
    assert result.exit_code == 1
    assert "not empty" in result.output and "--force" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_fixture_build_into_a_non_empty_folder_with_force(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    assert run("fixture", "build", "differencing-depth-1", tmp_path, "--force").exit_code == 0
    assert (tmp_path / "manifest.json").exists() and (tmp_path / "keep.txt").read_text() == "mine"
