"""``vhdx chain --json`` carries what a checkpoint timeline needs, per layer (issue 8 point 6)."""

from __future__ import annotations

import json
import os

from click.testing import CliRunner

from tests.forensics.helpers import FileGuard
from vhdx_cli.main import cli

TIMELINE_FIELDS = {"creator", "file_size", "allocated_bytes", "sequence_number", "data_write_guid",
                   "file_write_guid", "linkage", "modified_time"}


def test_timeline_chain_json_has_every_layer_with_its_timeline_fields(small_chain):
    os.utime(small_chain[0], (1_600_000_000, 1_600_000_000))
    guard = FileGuard(small_chain)
    result = CliRunner().invoke(cli, ["chain", str(small_chain[-1]), "--json"])
    assert result.exit_code == 0, result.output
    layers = json.loads(result.output)["layers"]
    assert [layer["path"] for layer in layers] == [str(p.resolve()) for p in reversed(small_chain)]
    for layer in layers:
        assert set(layer) >= TIMELINE_FIELDS
        assert layer["file_size"] == os.path.getsize(layer["path"]) and layer["allocated_bytes"] > 0
    # Each child links to the DataWriteGuid its parent has now, which orders the checkpoints.
    for child, parent in zip(layers, layers[1:], strict=False):
        assert parent["data_write_guid"] in child["linkage"]
    assert layers[-1]["modified_time"] == 1_600_000_000
    guard.assert_unchanged()
