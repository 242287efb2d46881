"""Every read command that opens a disk says in its --json whether a dirty log was replayed in memory."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from click.testing import CliRunner

from vhdx_cli.json_schemas import SCHEMAS
from vhdx_cli.main import cli

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a test dependency (pip install '.[test]')")
DIRTY = "qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2"

# Command -> its arguments after DISK (the disk read; written outputs go to the test's folder).
READ_COMMANDS = [
    *[(c, []) for c in ("info", "chain", "map", "check", "diff", "slack", "partitions")],
    ("convert", ["out.raw"]), ("flatten", ["flat.vhdx"]), ("compare", ["SAME"]),
    pytest.param("hash", [], marks=pytest.mark.slow),  # reads all 10 GiB of the corpus disk
]


def run_json(command: str, disk: str, extra: list[str]) -> dict:
    args = [disk if a == "SAME" else a for a in extra]
    result = CliRunner().invoke(cli, [command, "--json", disk, *args])
    assert result.exit_code in (0, 2), result.output  # check finds the dirty log: exit 2
    return json.loads(result.stdout)


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize(("command", "extra"), READ_COMMANDS)
def test_a_dirty_log_replayed_in_memory_is_flagged_and_the_file_left_as_is(corpus_image, tmp_path, monkeypatch,
                                                                           command, extra):
    disk = str(corpus_image(DIRTY))
    before = digest(disk)
    monkeypatch.chdir(tmp_path)
    data = run_json(command, disk, extra)
    assert data["log_replayed_in_memory"] is True
    jsonschema.validate(data, SCHEMAS[command])
    assert digest(disk) == before


@pytest.mark.parametrize(("command", "extra"), READ_COMMANDS)
def test_a_clean_disk_says_no_log_was_replayed(tmp_path, monkeypatch, command, extra):
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(cli, ["create", "clean.vhdx", "--size", "4M"]).exit_code == 0
    data = run_json(command, os.path.abspath("clean.vhdx"), extra)
    assert data["log_replayed_in_memory"] is False
