"""`vhdx resize` and `vhdx compact`: what they print, their JSON, and one-line refusals with exit code 1."""

from __future__ import annotations

import json
import os

from click.testing import CliRunner

import vhdx
from vhdx_cli.main import cli
from vhdx_cli.render import human_size

MiB = 1 << 20


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in (result.output or "")
    return result


def make(tmp_path, size="16M"):
    disk = tmp_path / "d.vhdx"
    assert run("create", disk, "--size", size, "--block-size", "1M").exit_code == 0
    assert run("write", disk, "--offset", "0", "--pattern", "0x11", "--length", "8M").exit_code == 0
    assert run("write", disk, "--offset", "2M", "--zero", "--length", "3M").exit_code == 0
    return disk


def test_cli_resize_says_what_it_will_do_and_did(tmp_path):
    disk = make(tmp_path)
    result = run("resize", disk, "--size", "1G")
    assert result.exit_code == 0
    assert f"resizing {disk} to 1073741824 bytes" in result.output
    assert "changed virtual size 16777216 -> 1073741824 bytes" in result.output
    assert "file size" in result.output
    with vhdx.open(disk) as image:
        assert image.virtual_size == 1 << 30


def test_cli_resize_json(tmp_path):
    disk = make(tmp_path)
    result = run("resize", disk, "--size", "12M", "--json")
    data = json.loads(result.output)
    assert (data["old_size"], data["new_size"], data["dry_run"]) == (16 * MiB, 12 * MiB, False)
    assert data["file_size_after"] == os.path.getsize(disk)


def test_cli_shrink_over_data_is_one_line_exit_1(tmp_path):
    disk = make(tmp_path)
    result = run("resize", disk, "--size", "4M")
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip() and "resizing" not in line]
    assert len(lines) == 1 and lines[0].startswith("vhdx: error:") and "--force" in lines[0]


def test_cli_resize_needs_size_or_resume(tmp_path):
    disk = make(tmp_path)
    result = run("resize", disk)
    assert result.exit_code == 1 and "--to-minimum" in result.output


def test_cli_compact_reports_released_bytes_and_file_sizes(tmp_path):
    disk = make(tmp_path)
    before = os.path.getsize(disk)
    result = run("compact", disk)
    assert result.exit_code == 0, result.output
    assert "released 0 zero blocks and the space of 3 trimmed blocks (3 MiB)" in result.output
    assert f"({human_size(before - os.path.getsize(disk))} released)" in result.output


def test_cli_compact_dry_run_json_changes_nothing(tmp_path):
    disk = make(tmp_path)
    before = disk.read_bytes()
    data = json.loads(run("compact", disk, "--dry-run", "--json").output)
    assert data["trimmed_blocks_released"] == 3 and data["dry_run"] and data["file_size_after"] is None
    assert disk.read_bytes() == before


def test_cli_compact_fixed_is_refused_in_one_line(tmp_path):
    disk = tmp_path / "f.vhdx"
    run("create", disk, "--size", "4M", "--type", "fixed", "--block-size", "1M")
    result = run("compact", disk)
    assert result.exit_code == 1 and "convert --type dynamic" in result.output.splitlines()[-1]
