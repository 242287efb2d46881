"""``discard`` reports only what it changed; ``repair --dry-run`` exits as the real run will."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

import vhdx
from vhdx.ops.create import create
from vhdx_cli.main import cli

MiB = 1 << 20


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in (result.output or "")
    return result


def written_disk(tmp_path, disk_type="dynamic", size=8 * MiB, block_size=MiB):
    path = tmp_path / "d.vhdx"
    create(path, size, block_size=block_size, type=disk_type)
    with vhdx.open(path, writable=True) as image:
        image.write(0, b"\x7f" * size)
    return path


# --- discard ---------------------------------------------------------------------------------------
def test_library_discard_returns_the_bytes_it_unmapped(tmp_path):
    path = written_disk(tmp_path)
    with vhdx.open(path, writable=True) as image:
        assert image.discard(MiB // 2, 3 * MiB) == 2 * MiB  # blocks 1 and 2 only
        assert image.discard(MiB, MiB) == 0  # already unmapped: nothing changes


def test_discard_inside_one_block_says_nothing_was_discarded(tmp_path):
    path = written_disk(tmp_path)
    result = run("discard", path, "--offset", "4096", "--length", "8192")
    assert result.exit_code == 0, result.output
    assert "discarded 0 bytes" in result.output
    assert "no whole block" in result.output
    with vhdx.open(path) as image:
        assert image.read(4096, 8192) == b"\x7f" * 8192


def test_discard_on_a_fixed_disk_says_nothing_was_discarded(tmp_path):
    path = written_disk(tmp_path, disk_type="fixed")
    result = run("discard", path, "--offset", "0", "--length", "8M")
    assert result.exit_code == 0, result.output
    assert "discarded 0 bytes" in result.output
    assert "fixed" in result.output


def test_discard_reports_the_whole_blocks_it_unmapped(tmp_path):
    path = written_disk(tmp_path)
    result = run("discard", path, "--offset", "512K", "--length", "3M")
    assert result.exit_code == 0, result.output
    assert "discarded 2097152 bytes" in result.output
    assert "discarded 3145728" not in result.output


# --- repair exit codes -----------------------------------------------------------------------------
@pytest.mark.parametrize("leaks", [True, False])
def test_repair_dry_run_exit_code_matches_the_real_run_for_a_leak(tmp_path, leaks):
    path = written_disk(tmp_path)
    os.truncate(path, os.path.getsize(path) + 2 * MiB)
    flag = ["--leaks"] if leaks else []
    dry = run("repair", path, "--dry-run", *flag)
    real = run("repair", path, *flag)
    assert dry.exit_code == real.exit_code, (dry.output, real.output)


def test_repair_dry_run_exit_code_matches_the_real_run_for_unrepairable_damage(tmp_path):
    path = written_disk(tmp_path)
    with open(path, "r+b") as f:  # both headers gone: refused, nothing changes
        for offset in (64 * 1024, 128 * 1024):
            f.seek(offset)
            f.write(b"XXXX")
    dry = run("repair", path, "--dry-run", "--leaks")
    real = run("repair", path, "--leaks")
    assert dry.exit_code == real.exit_code == 2, (dry.output, real.output)
