"""Hostile logs (issue 12, items 7 and 8): a log is validated before any replay and scanned in linear time.

Each entry here carries a valid checksum, so only the rules about what a log may change stop it: never the
header section except into valid region tables ([MS-VHDX] 2.2.3 logs region table updates), never the log
itself, never past the largest file the layout can need. A violating log is ``LOG_INVALID`` (not repairable),
and open, write, merge and repair all refuse it without writing a byte. Scanning is linear in the entries and
reads the log in bounded pieces.
"""

from __future__ import annotations

import os
import subprocess
import time
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

import vhdx
from tests.support.hostile_logs import MiB, chain_of_empty_entries, layout_of, plant_log, small_disk
from vhdx.errors import FormatError
from vhdx.format import checksum
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.ops.check import check_image
from vhdx.ops.repair import plan_repair, repair_image
from vhdx.structures.header import load_headers
from vhdx.structures.log import SECTOR, DataWrite, ZeroWrite, read_log
from vhdx_cli.main import cli

TiB = 1 << 40


@pytest.fixture
def disk(tmp_path) -> Path:
    return small_disk(tmp_path / "disk.vhdx")


def _log_invalid(path: Path):
    report = check_image(path)
    return report, report.find("LOG_INVALID")


def _snapshot(path: Path) -> tuple[int, bytes]:
    return path.stat().st_size, path.read_bytes()


# --- item 7: what a log may target ------------------------------------------------------------------
def test_data_entry_at_offset_zero_is_log_invalid_and_not_repairable(disk):
    log = plant_log(disk, [(0, [DataWrite(0, bytes(SECTOR))])])
    report, invalid = _log_invalid(disk)
    assert report.exit_code == 2
    assert [(f.offset, f.repairable) for f in invalid] == [(log, False)]
    assert "header section" in invalid[0].message
    assert not report.find("LOG_DIRTY")


def test_repair_refuses_a_log_writing_the_header_section_and_changes_nothing(disk):
    plant_log(disk, [(0, [DataWrite(0, bytes(SECTOR))])])
    before = _snapshot(disk)
    plan = plan_repair(check_image(disk))
    assert not plan.actions
    assert [r.code for r in plan.refusals] == ["LOG_INVALID"]
    result = CliRunner().invoke(cli, ["repair", str(disk)])
    assert result.exit_code != 0
    assert _snapshot(disk) == before
    assert check_image(disk).find("LOG_INVALID")


@pytest.mark.parametrize("target", [64 * 1024, 192 * 1024, 256 * 1024], ids=["header1", "region1", "region2"])
def test_log_writing_a_header_or_region_table_is_invalid(disk, target):
    plant_log(disk, [(0, [DataWrite(target, bytes(SECTOR))])])
    assert _log_invalid(disk)[1]


def test_log_rewriting_the_region_tables_into_valid_ones_is_replayed(disk):
    # Spec 2.2.3: region table updates go through the log (a resize that moves the BAT or metadata does this),
    # both copies alike. The table's CRC covers all 64 KiB, so the new first sector carries a restamped CRC.
    raw = disk.read_bytes()
    whole = bytearray(raw[192 * 1024 : 256 * 1024])
    whole[16 + 28] ^= 1  # the first entry's Required flag
    checksum.stamp(whole, c.REGION_TABLE_CHECKSUM_OFFSET)
    new_sector = bytes(whole[:SECTOR])
    plant_log(disk, [(0, [DataWrite(table, new_sector) for table in c.REGION_TABLE_OFFSETS])])
    report, invalid = _log_invalid(disk)
    assert not invalid and report.find("LOG_DIRTY")
    repair_image(disk)
    raw = disk.read_bytes()
    assert [raw[t : t + SECTOR] for t in c.REGION_TABLE_OFFSETS] == [new_sector, new_sector]
    assert check_image(disk).exit_code == 0


def test_log_rewriting_a_region_table_into_a_broken_one_is_invalid(disk):
    plant_log(disk, [(0, [DataWrite(192 * 1024, b"regi" + bytes(SECTOR - 4))])])
    invalid = _log_invalid(disk)[1]
    assert invalid and "fails its signature or checksum" in invalid[0].message


def test_log_zeroing_a_region_table_is_invalid(disk):
    plant_log(disk, [(0, [ZeroWrite(192 * 1024, SECTOR)])])
    assert _log_invalid(disk)[1]


def test_log_writing_into_the_log_itself_is_invalid(disk):
    lay = layout_of(disk)
    plant_log(disk, [(0, [DataWrite(lay["log"] + 8 * SECTOR, bytes(SECTOR))])])
    invalid = _log_invalid(disk)[1]
    assert invalid and "inside the log itself" in invalid[0].message


def test_one_tebibyte_zero_range_is_refused_without_allocating(disk):
    log = plant_log(disk, [(0, [ZeroWrite(8 * MiB, TiB)])])
    before = _snapshot(disk)
    with pytest.raises(FormatError) as info:
        vhdx.open(disk)
    assert info.value.offset == log and "largest file this layout can need" in str(info.value)
    assert _log_invalid(disk)[1][0].offset == log
    result = CliRunner().invoke(cli, ["repair", str(disk)])
    assert result.exit_code != 0 and "MemoryError" not in result.output
    assert _snapshot(disk) == before


def test_two_gibibyte_zero_range_past_the_layout_writes_nothing(disk):
    plant_log(disk, [(0, [ZeroWrite(8 * MiB, 2 << 30)])])
    before = _snapshot(disk)
    assert CliRunner().invoke(cli, ["repair", str(disk)]).exit_code != 0
    with pytest.raises(FormatError):
        vhdx.open(disk, writable=True)
    assert _snapshot(disk) == before


def test_last_file_offset_past_the_layout_is_invalid(disk):
    plant_log(disk, [(0, [])], last=TiB)
    invalid = _log_invalid(disk)[1]
    assert invalid and "LastFileOffset" in invalid[0].message


def test_writable_open_write_and_merge_refuse_an_invalid_log(tmp_path, disk):
    plant_log(disk, [(0, [DataWrite(0, bytes(SECTOR))])])
    before = _snapshot(disk)
    with pytest.raises(FormatError, match="invalid log"):
        vhdx.open(disk, writable=True)
    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * 512)
    result = CliRunner().invoke(cli, ["write", str(disk), "--input", str(data), "--offset", "0"])
    assert result.exit_code == 1, result.output
    assert "invalid log" in result.output and "Traceback" not in result.output
    assert _snapshot(disk) == before


def test_invalid_log_is_reported_by_the_cli_in_one_line(disk):
    plant_log(disk, [(0, [ZeroWrite(8 * MiB, TiB)])])
    result = CliRunner().invoke(cli, ["info", str(disk)])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if "invalid log" in line]
    assert len(errors) == 1 and "Traceback" not in result.output


# --- what a log may still do ------------------------------------------------------------------------
def test_zero_range_inside_a_payload_block_replays_in_memory_and_on_disk(disk):
    block0 = 4 * MiB  # vhdx.ops.create puts the first payload block here (see layout_of)
    with vhdx.open(disk) as image:
        assert int(image.bat.offsets[0]) == block0
    plant_log(disk, [(0, [ZeroWrite(block0 + 8192, 3 * SECTOR)])])
    with vhdx.open(disk) as image:
        seen = image.read(0, 5 * SECTOR)
    assert seen[:8192] != bytes(8192) and seen[8192 : 8192 + 3 * SECTOR] == bytes(3 * SECTOR)
    assert repair_image(disk).changes
    with vhdx.open(disk) as image:
        assert image.read(0, 5 * SECTOR) == seen
    assert check_image(disk).exit_code == 0


def test_zero_range_past_the_end_of_file_inside_the_layout_grows_the_file_without_writing(disk):
    end = disk.stat().st_size
    plant_log(disk, [(0, [ZeroWrite(end, 2 * MiB)])])
    assert not _log_invalid(disk)[1]
    used = os.stat(disk).st_blocks * 512
    repair_image(disk)
    assert disk.stat().st_size == end + 2 * MiB
    assert os.stat(disk).st_blocks * 512 - used < MiB  # the new space is a hole: no zeros were written there


def test_later_zero_range_hides_an_earlier_sector_and_a_later_sector_wins_over_a_zero(disk):
    block0 = 4 * MiB
    marked = b"\xab" * SECTOR
    plant_log(disk, [(0, [DataWrite(block0, marked), ZeroWrite(block0, 2 * SECTOR),
                          DataWrite(block0 + SECTOR, marked)])])
    with vhdx.open(disk) as image:
        assert image.read(0, 2 * SECTOR) == bytes(SECTOR) + marked


# --- item 8: linear scan, bounded memory ------------------------------------------------------------
def test_sixteen_thousand_chained_entries_are_found_in_linear_time(tmp_path):
    path = small_disk(tmp_path / "long.vhdx", log_size=80 * MiB)
    plant_log(path, chain_of_empty_entries(16384))
    start = time.perf_counter()
    with vhdx.open(path) as image:
        assert len(image.log.sequence) == 16384
    # Quadratic scanning took 24 s for 8192 entries on the CI machine (and four times that for 16384).
    assert time.perf_counter() - start < 15


def test_only_the_sequence_whose_head_tail_points_inside_it_is_replayed(disk):
    # Entries 1-3 chain but the head's Tail names a slot outside the chain: no valid sequence.
    plant_log(disk, chain_of_empty_entries(3), tail=40 * SECTOR)
    report = check_image(disk)
    assert report.find("LOG_NO_VALID_SEQUENCE")


def test_highest_head_wins_among_several_valid_sequences(disk):
    plant_log(disk, [(0, []), (SECTOR, [])], first_sequence=5, tail=0)
    plant_log(disk, [(16 * SECTOR, [])], first_sequence=9, tail=16 * SECTOR)
    io = ImageIO.open(disk)
    try:
        h = load_headers(io).current
        log = read_log(io, h.log_offset, h.log_length, h.log_guid)
    finally:
        io.close()
    assert [e.sequence_number for e in log.sequence] == [9]


def test_sparse_four_gibibyte_log_is_scanned_in_bounded_memory(tmp_path):
    path = small_disk(tmp_path / "sparse.vhdx", log_size=4095 * MiB)
    subprocess.run(["fallocate", "-p", "-o", str(MiB), "-l", str(4095 * MiB), str(path)], check=True)
    plant_log(path, [(4095 * MiB - SECTOR, [])])
    io = ImageIO.open(path)
    tracemalloc.start()
    try:
        h = load_headers(io).current
        log = read_log(io, h.log_offset, h.log_length, h.log_guid)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        io.close()
    assert len(log.sequence) == 1
    assert peak < 64 * MiB  # the old scan held the whole log and a copy: 8.2 GiB RSS


@pytest.mark.parametrize("hostile", ["child", "parent"])
def test_merge_refuses_an_invalid_log_in_either_layer_and_changes_nothing(tmp_path, hostile):
    from vhdx.ops.create import create

    parent = small_disk(tmp_path / "parent.vhdx")
    child = tmp_path / "child.avhdx"
    create(child, parent=parent)
    with vhdx.open(child, writable=True) as image:
        image.write(0, b"\x22" * SECTOR)
    plant_log(child if hostile == "child" else parent, [(0, [DataWrite(0, bytes(SECTOR))])])
    before = {p: _snapshot(p) for p in (parent, child)}
    result = CliRunner().invoke(cli, ["merge", str(child)])
    assert result.exit_code != 0 and "invalid log" in result.output, result.output
    assert "Traceback" not in result.output
    assert {p: _snapshot(p) for p in (parent, child)} == before


def test_dense_log_is_read_in_bounded_pieces(tmp_path):
    # No holes to skip: 64 MiB of junk around one entry must still be read a piece at a time.
    path = small_disk(tmp_path / "dense.vhdx", log_size=64 * MiB)
    with open(path, "r+b") as f:
        f.seek(MiB)
        for _ in range(64):
            f.write(b"\xab" * MiB)
    plant_log(path, [(32 * MiB, [])])
    io = ImageIO.open(path)
    tracemalloc.start()
    try:
        h = load_headers(io).current
        log = read_log(io, h.log_offset, h.log_length, h.log_guid)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        io.close()
    assert [e.log_offset for e in log.sequence] == [32 * MiB]
    assert peak < 16 * MiB  # the old scan read the whole 64 MiB log at once
