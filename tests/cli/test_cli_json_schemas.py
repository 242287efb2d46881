"""Every command's --json validates against its documented schema (vhdx_cli.json_schemas)."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from tests.forensics.helpers import build_chain
from vhdx_cli.json_schemas import SCHEMAS
from vhdx_cli.main import cli

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a test dependency (pip install '.[test]')")
MiB = 1 << 20


@pytest.fixture()
def chain(tmp_path, monkeypatch):
    child_ops = [("write", MiB, b"b" * 65536), ("discard", 2 * MiB, MiB)]
    paths = build_chain(tmp_path, [[("write", 0, b"a" * MiB)], child_ops])
    monkeypatch.chdir(tmp_path)  # relative names on the command line: the JSON must still give absolute paths
    return [os.path.basename(p) for p in paths]


def json_of(*args, exit_code: int = 0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == exit_code, result.output
    return json.loads(result.stdout)


COMMANDS = {
    "info": lambda base, child: ["info", "--json", child],
    "chain": lambda base, child: ["chain", "--json", child],
    "map": lambda base, child: ["map", "--json", child],
    "check": lambda base, child: ["check", "--json", "--chain", child],
    "hash": lambda base, child: ["hash", "--json", child],
    "diff": lambda base, child: ["diff", "--json", child],
    "compare": lambda base, child: ["compare", "--json", base, child],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_json_matches_its_schema(chain, command):
    base, child = chain
    data = json_of(*COMMANDS[command](base, child), exit_code=1 if command == "compare" else 0)
    jsonschema.validate(data, SCHEMAS[command])


def test_every_schema_is_a_valid_json_schema():
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_error_json_matches_its_schema(tmp_path):
    bad = tmp_path / "x.vhdx"
    bad.write_bytes(b"conectix" + bytes(600))
    jsonschema.validate(json_of("info", "--json", bad, exit_code=1), SCHEMAS["error"])


def test_info_json_gives_the_absolute_path_and_the_name_as_given(chain):
    data = json_of("info", "--json", chain[1])
    assert os.path.isabs(data["path"]) and data["path_given"] == chain[1]
    assert data["parent_locator"]["entries"]["relative_path"] == ".\\" + chain[0]
    assert data["parent_status"]["path"] == os.path.abspath(chain[0])


def test_a_schema_rejects_a_relative_path():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"schema_version": 1, "a": "rel.vhdx", "b": "/x", "size_a": 1, "size_b": 1,
                             "strict": False, "identical": True, "size_mismatch": False, "first_mismatch": None,
                             "extents": []}, SCHEMAS["compare"])


@pytest.mark.parametrize("where", ["global", "command"])
def test_writing_commands_answer_in_json_too(tmp_path, where):
    def run_json(*args):
        args = ["--json", *args] if where == "global" else [*args, "--json"]
        return json_of(*args)

    disk, raw, flat = tmp_path / "d.vhdx", tmp_path / "d.raw", tmp_path / "f.vhdx"
    created = run_json("create", disk, "--size", "4M", "--block-size", "1M")
    jsonschema.validate(created, SCHEMAS["create"])
    assert created["virtual_size"] == 4 * MiB and created["disk_type"] == "dynamic"
    jsonschema.validate(run_json("write", disk, "--offset", "0", "--pattern", "0x33", "--length", "4096"),
                        SCHEMAS["write"])
    jsonschema.validate(run_json("discard", disk, "--offset", "1M", "--length", "1M"), SCHEMAS["discard"])
    converted = run_json("convert", disk, raw)
    jsonschema.validate(converted, SCHEMAS["convert"])
    assert converted["destination_size"] == 4 * MiB
    child = tmp_path / "c.avhdx"
    run_json("create", child, "--parent", disk)
    jsonschema.validate(run_json("flatten", child, flat), SCHEMAS["flatten"])
