"""``slack`` finds data planted in leaked blocks, stale blocks, the log and the file tail, at the right offsets."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import vhdx
from tests.forensics.helpers import FileGuard, MiB, build_chain, pattern
from vhdx.forensics.slack import _subtract, find_slack, nonzero_runs
from vhdx_cli.main import cli

EVIDENCE = b"EVIDENCE: planted where no structure looks"


def block_offset_and_entry(path, block: int) -> tuple[int, int]:
    with vhdx.open(path) as image:
        index = int(image.geometry.payload_index(block))
        return int(image.bat.offsets[block]), image.bat.entry_file_offset(index)


def patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def regions_with(report, category: str):
    return [r for r in report.regions if r.category == category]


def slack_of(path):
    with vhdx.open(path, orphan=True) as image:
        return find_slack(image)


@pytest.fixture
def three_blocks(tmp_path):
    """A dynamic disk with data in blocks 0, 2 and 4 (block 2: 5000 bytes at in-block offset 1000)."""
    return build_chain(tmp_path, [[("write", 0, pattern(1, MiB)), ("write", 2 * MiB + 1000, pattern(2, 5000)),
                                   ("write", 4 * MiB, pattern(3, MiB))]])[0]


def test_slack_finds_data_in_a_leaked_block(three_blocks):
    offset, entry = block_offset_and_entry(three_blocks, 2)
    patch(three_blocks, entry, struct.pack("<Q", 0))  # NOT_PRESENT, no file offset: the block is leaked
    leaked = regions_with(slack_of(three_blocks), "unreferenced")
    assert [(r.start, r.length) for r in leaked] == [(offset, MiB)]
    assert leaked[0].nonzero == ((offset + 1000, 5000),)


def test_slack_finds_data_in_a_block_whose_state_says_not_present(three_blocks):
    offset, entry = block_offset_and_entry(three_blocks, 2)
    patch(three_blocks, entry, struct.pack("<Q", offset))  # state 0 but the file offset kept
    stale = regions_with(slack_of(three_blocks), "stale-block")
    assert len(stale) == 1 and "payload block 2 (NOT_PRESENT)" in stale[0].detail
    assert stale[0].nonzero == ((offset + 1000, 5000),)


def test_slack_finds_old_data_of_a_zeroed_block(three_blocks):
    offset, _ = block_offset_and_entry(three_blocks, 4)
    with vhdx.open(three_blocks, writable=True) as image:
        image.write_zeros(4 * MiB, MiB)  # ZERO keeps the offset; the old bytes stay in the file
    stale = regions_with(slack_of(three_blocks), "stale-block")
    assert [(r.start, r.nonzero) for r in stale] == [(offset, ((offset, MiB),))]


def test_slack_finds_data_in_the_unused_log_of_a_clean_file(three_blocks):
    with vhdx.open(three_blocks) as image:
        log_offset, log_length = image.log.log_offset, image.log.log_length
        assert not image.log.is_dirty
    planted = log_offset + 900 * 1024 + 3
    patch(three_blocks, planted, EVIDENCE)
    logs = regions_with(slack_of(three_blocks), "log")
    assert [(r.start, r.length) for r in logs] == [(log_offset, log_length)]
    assert (planted, len(EVIDENCE)) in logs[0].nonzero


def test_slack_skips_the_active_entries_of_a_dirty_log(three_blocks):
    image = vhdx.open(three_blocks, writable=True)
    image.write(6 * MiB, pattern(4, 4096))
    image.flush()
    image.io.close()  # a crash: the header still names the log, whose entry must be replayed
    with vhdx.open(three_blocks) as reopened:
        log = reopened.log
        assert log.needs_replay
        active = [(log.log_offset + e.log_offset, e.entry_length) for e in log.sequence]
    planted = log.log_offset + 800 * 1024
    patch(three_blocks, planted, EVIDENCE)
    logs = regions_with(slack_of(three_blocks), "log")
    for start, length in active:
        assert all(r.start + r.length <= start or start + length <= r.start for r in logs)
    assert any((planted, len(EVIDENCE)) in r.nonzero for r in logs)


def test_slack_finds_data_behind_the_last_block(three_blocks):
    end = os.path.getsize(three_blocks)
    patch(three_blocks, end + 4096, EVIDENCE)
    tails = regions_with(slack_of(three_blocks), "file-tail")
    assert [(r.start, r.nonzero) for r in tails] == [(end, ((end + 4096, len(EVIDENCE)),))]


def test_slack_finds_data_in_the_header_section_reserved_area(three_blocks):
    patch(three_blocks, 0x60000 + 17, EVIDENCE)
    patch(three_blocks, 0x10000 + 8192, EVIDENCE)
    report = slack_of(three_blocks)
    assert regions_with(report, "reserved")[0].nonzero == ((0x60000 + 17, len(EVIDENCE)),)
    assert regions_with(report, "header-slot")[0].nonzero == ((0x10000 + 8192, len(EVIDENCE)),)


def test_slack_reports_unused_sectors_of_a_partial_block(small_chain):
    offset, _ = block_offset_and_entry(small_chain[1], 0)
    report = slack_of(small_chain[1])
    partial = [(r.start, r.length) for r in regions_with(report, "partial-block")]
    assert partial == [(offset, 4096), (offset + 4096 + 1024, MiB - 5120)]


def test_slack_extract_copies_each_non_zero_run(three_blocks, tmp_path):
    offset, entry = block_offset_and_entry(three_blocks, 2)
    patch(three_blocks, entry, struct.pack("<Q", 0))
    with vhdx.open(three_blocks) as image:
        report = find_slack(image, extract_dir=tmp_path / "out")
        expected = pattern(2, 5000)
    name = next(p for p in report.extracted if ".unreferenced." in p)
    assert Path(name).read_bytes() == expected
    assert name.endswith(f"{offset + 1000:#014x}.bin")


def test_slack_nonzero_runs_are_exact_bytes_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr("vhdx.forensics.slack.SCAN_CHUNK", 4096)
    path = tmp_path / "f"
    data = bytearray(5 * 4096)
    data[4090:4100] = b"x" * 10  # crosses a chunk edge
    data[9000] = 1
    path.write_bytes(bytes(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert nonzero_runs(fd, 0, len(data)) == [(4090, 10), (9000, 1)]
        assert nonzero_runs(fd, 4095, 4000) == [(4095, 5)]
    finally:
        os.close(fd)


def test_slack_subtract_removes_cut_ranges():
    s, e = _subtract(np.array([0, 100]), np.array([50, 200]), np.array([10, 120, 150]), np.array([20, 130, 300]))
    assert list(zip(s.tolist(), e.tolist(), strict=True)) == [(0, 10), (20, 50), (100, 120), (130, 150)]


def test_slack_cli_walks_the_chain_unless_orphan(small_chain):
    guard = FileGuard(small_chain)
    whole = CliRunner().invoke(cli, ["slack", str(small_chain[-1]), "--json"])
    alone = CliRunner().invoke(cli, ["slack", str(small_chain[-1]), "--orphan", "--json"])
    assert whole.exit_code == 0 and alone.exit_code == 0, whole.output + alone.output
    assert len(json.loads(whole.output)["layers"]) == 3 and len(json.loads(alone.output)["layers"]) == 1
    guard.assert_unchanged()


def test_slack_cli_refuses_to_extract_into_the_evidence_folder(three_blocks):
    result = CliRunner().invoke(cli, ["slack", str(three_blocks), "--extract", str(three_blocks.parent)])
    assert result.exit_code == 1 and "other than the evidence" in result.output
