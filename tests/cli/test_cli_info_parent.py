"""`vhdx info` on a differencing disk: how its parent resolves, or (--orphan) what the file holds alone."""

from __future__ import annotations

import json

from click.testing import CliRunner

import vhdx
from vhdx_cli.main import cli

MiB = 1 << 20


def make_child(tmp_path):
    base, child = tmp_path / "base.vhdx", tmp_path / "snap.avhdx"
    vhdx.create_image(base, 8 * MiB, block_size=MiB)
    vhdx.create_image(child, parent=base, block_size=MiB)
    with vhdx.open(child, writable=True) as disk:
        disk.write(MiB, b"\x01" * 4096)
    return base, child


def info_json(*args):
    result = CliRunner().invoke(cli, ["info", "--json", *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["parent_status"]


def test_info_reports_where_the_parent_was_found(tmp_path):
    base, child = make_child(tmp_path)
    status = info_json(child)
    assert status == {"found": True, "path": str(base), "found_by": "relative_path", "linkage_ok": True}


def test_info_orphan_counts_what_the_checkpoint_holds_alone(tmp_path):
    _, child = make_child(tmp_path)
    status = info_json("--orphan", child)
    assert status == {"orphan": True, "held_bytes": 4096, "absent_bytes": 8 * MiB - 4096}


def test_info_with_a_missing_parent_still_shows_everything(tmp_path):
    base, child = make_child(tmp_path)
    base.unlink()
    status = info_json(child)
    assert status["found"] is False and "parent not found" in status["error"]
    text = CliRunner().invoke(cli, ["info", str(child)])
    assert text.exit_code == 0 and "parent: NOT AVAILABLE" in text.output and "BAT:" in text.output


def test_info_of_a_base_disk_has_no_parent_status(tmp_path):
    base, _ = make_child(tmp_path)
    assert info_json(base) is None
