"""In --json mode an error is JSON on stdout (and still one line on stderr), with the same exit code."""

from __future__ import annotations

import json

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
def not_vhdx(tmp_path):
    path = tmp_path / "evidence.img"
    path.write_bytes(b"QFI\xfb" + bytes(4096))
    return path


@pytest.mark.parametrize("where", ["global", "command"])
def test_a_library_error_in_json_mode_is_json_on_stdout(not_vhdx, where):
    args = ["--json", "info", not_vhdx] if where == "global" else ["info", not_vhdx, "--json"]
    result = run(*args)
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["schema_version"] == 1
    assert data["error"]["exit_code"] == 1
    assert "qcow2" in data["error"]["message"]
    assert data["error"]["structure"] == "File Type Identifier" and data["error"]["offset"] == 0
    assert "qcow2" in result.stderr  # humans still see the one line


def test_a_usage_error_in_json_mode_is_json_on_stdout(tmp_path):
    result = run("--json", "info", tmp_path / "missing.vhdx")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["exit_code"] == 1


def test_compare_error_in_json_mode_keeps_its_exit_code(tmp_path, not_vhdx):
    good = tmp_path / "g.vhdx"
    vhdx.create_image(good, 4 * MiB, block_size=MiB)
    bad = tmp_path / "bad.vhdx"
    bad.write_bytes(b"vhdxfile" + bytes(100))
    result = run("compare", "--json", good, bad)
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["exit_code"] == 2


def test_errors_without_json_stay_off_stdout(not_vhdx):
    result = run("info", not_vhdx)
    assert result.exit_code == 1 and result.stdout == ""


def test_json_documents_carry_a_schema_version(tmp_path):
    disk = tmp_path / "d.vhdx"
    vhdx.create_image(disk, 4 * MiB, block_size=MiB)
    for command in (["info"], ["chain"], ["check"], ["hash", "--no-layers"]):
        assert json.loads(run("--json", *command, disk).stdout)["schema_version"] == 1, command
