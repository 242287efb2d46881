"""Output that reads like the tools users know: binary units, short summaries, quiet pipes, exact labels."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

import vhdx
from tests.forensics.helpers import build_chain
from vhdx_cli.main import cli
from vhdx_cli.render import human_size

MiB = 1 << 20


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in (result.output or "")
    return result


def test_human_size_shows_exact_units_without_a_decimal():
    assert human_size(32 * MiB) == "32 MiB"
    assert human_size(512) == "512 B"
    assert human_size(1536 * MiB) == "1.5 GiB"


def test_info_shows_the_block_size_in_binary_units(tmp_path):
    disk = tmp_path / "d.vhdx"
    vhdx.create_image(disk, 16 * MiB, block_size=MiB)
    out = run("info", disk).output
    assert "block size: 1 MiB (1048576 bytes)" in out


def test_hash_orphan_summarises_absent_ranges_in_one_line(tmp_path):
    # The child writes every other block: its absent ranges (from the lost parent) are 32 separate runs.
    writes = [("write", 2 * i * MiB, b"x" * MiB) for i in range(32)]
    _, child = build_chain(tmp_path, [[], writes], size=64 * MiB)
    result = run("hash", "--orphan", "--no-layers", child)
    assert result.exit_code == 0, result.output
    absent = [line for line in result.output.splitlines() if "absent" in line]
    assert len(absent) == 1, result.output
    assert "32 ranges" in absent[0] and "32 MiB" in absent[0]


def test_hash_orphan_json_still_lists_every_absent_range(tmp_path):
    writes = [("write", 2 * i * MiB, b"x" * MiB) for i in range(8)]
    _, child = build_chain(tmp_path, [[], writes], size=16 * MiB)
    data = json.loads(run("hash", "--orphan", "--no-layers", "--json", child).output)
    assert len(data["absent"]) == 8


def test_output_into_a_closed_pipe_exits_quietly(tmp_path):
    disk = tmp_path / "d.vhdx"
    vhdx.create_image(disk, 64 * MiB, block_size=MiB)
    # 16384 lines of piece hashes: far more than a pipe buffer holds once the reader has gone (like `| head -1`).
    proc = subprocess.Popen([sys.executable, "-m", "vhdx_cli.main", "hash", "--no-layers", "--piece-size", "4K",
                             str(disk)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert stderr == ""
    assert proc.returncode == 141  # what the shell reports for a tool that SIGPIPE stopped (qemu-img, cat)


def test_fixture_build_labels_the_flattened_hash(tmp_path):
    result = run("fixture", "build", "differencing-depth-1", tmp_path / "out")
    assert result.exit_code == 0, result.output
    layer_lines = [line for line in result.output.splitlines() if not line.startswith("manifest:")]
    assert layer_lines and all("flattened sha256 " in line for line in layer_lines), result.output


def test_merge_summary_after_the_fact_gives_the_real_file_size(tmp_path):
    base, child = build_chain(tmp_path, [[], [("write", 0, b"y" * MiB)]])
    out = run("merge", child).output
    assert "estimate" not in out
    assert f"-> {human_size(base.stat().st_size)}" in out


def test_merge_dry_run_still_calls_its_size_an_estimate(tmp_path):
    _, child = build_chain(tmp_path, [[], [("write", 0, b"y" * MiB)]])
    assert "(estimate)" in run("merge", "--dry-run", child).output


def test_map_shows_unmapped_blocks_apart_from_zero_blocks(tmp_path):
    (disk,) = build_chain(tmp_path, [[("write", 0, b"d" * 4 * MiB), ("zero", MiB, MiB), ("discard", 2 * MiB, MiB)]])
    rows = json.loads(run("map", "--json", disk).output)["extents"]
    states = {(r["start"], r["state"]) for r in rows}
    assert (MiB, "zero") in states
    assert (2 * MiB, "unmapped") in states
    text = run("map", disk).output
    assert "unmapped" in text and "zero" in text
