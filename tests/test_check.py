"""``check``: each fault, built here by hand, is reported with its code and the file offset it names.

Images are small dynamic/differencing disks made with ``vhdx.ops.create`` and written through the writer; each
test breaks one thing with raw ``pwrite``/``truncate`` and checks the findings. The fixture library's named
faults are checked too, against the findings their manifest documents.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import vhdx
from vhdx.findings import CODES
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.ops.check import check_image
from vhdx.ops.create import create
from vhdx.ops.relink import set_parent
from vhdx.structures.header import load_headers
from vhdx.structures.log import DataWrite, build_entry
from vhdx_cli.main import cli

MiB = 1 << 20
SIZE = 8 * MiB
# Layout of files made by vhdx.ops.create: log at 1 MiB, metadata at 2 MiB, BAT at 3 MiB, blocks from 4 MiB.
LOG_OFFSET, METADATA_OFFSET, BAT_OFFSET = 1 * MiB, 2 * MiB, 3 * MiB


def pattern(seed: int, length: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()


def make_dynamic(path: Path, blocks=(0, 1, 5), size: int = SIZE) -> Path:
    """A dynamic disk with 1 MiB blocks and the given blocks written with seeded bytes."""
    create(path, size, block_size=MiB, logical_sector_size=512)
    with vhdx.open(path, writable=True) as image:
        for b in blocks:
            image.write(b * MiB, pattern(b, MiB))
    return path


def make_child(parent: Path, path: Path, writes=((MiB + 4096, 8192),)) -> Path:
    create(path, parent=parent)
    with vhdx.open(path, writable=True) as image:
        for offset, length in writes:
            image.write(offset, pattern(offset, length))
    return path


def pwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def pread(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def bat_entry(path: Path, index: int) -> int:
    return struct.unpack("<Q", pread(path, BAT_OFFSET + 8 * index, 8))[0]


def set_bat_entry(path: Path, index: int, value: int) -> int:
    pwrite(path, BAT_OFFSET + 8 * index, struct.pack("<Q", value))
    return BAT_OFFSET + 8 * index


def findings(report, code: str) -> list[tuple[int | None, str]]:
    return [(f.offset, f.severity.value) for f in report.all_findings if f.code == code]


def current_header_index(path: Path) -> int:
    io = ImageIO.open(path)
    try:
        return load_headers(io).current_index
    finally:
        io.close()


def make_dirty(path: Path, writes: list[DataWrite], *, torn: bool = False) -> int:
    """Put a log entry carrying ``writes`` into the log and name its GUID in the current header.

    Returns the file offset of the entry. With ``torn`` the entry's last byte is damaged (checksum fails).
    """
    io = ImageIO.open(path, writable=True)
    try:
        headers = load_headers(io)
        guid = uuid.uuid4()
        size = -(-io.real_size // MiB) * MiB
        entry = bytearray(build_entry(writes, sequence_number=1, log_guid=guid, tail=0, flushed_file_offset=size,
                                      last_file_offset=size))
        if torn:
            entry[-1] ^= 0xFF
        io.write_at(LOG_OFFSET, entry)
        copy = headers.current_copy
        io.write_at(copy.offset, replace(headers.current, log_guid=guid).to_bytes())
        io.flush()
    finally:
        io.close()
    return LOG_OFFSET


@pytest.fixture
def dynamic(tmp_path) -> Path:
    return make_dynamic(tmp_path / "disk.vhdx")


# --- clean images -----------------------------------------------------------------------------------
def test_check_fresh_dynamic_disk_is_clean(dynamic):
    report = check_image(dynamic)
    assert report.exit_code == 0, report.all_findings
    assert report.findings == ()


def test_check_differencing_chain_is_clean(tmp_path):
    base = make_dynamic(tmp_path / "base.vhdx")
    child = make_child(base, tmp_path / "child.avhdx")
    report = check_image(child, chain=True)
    assert report.exit_code == 0, report.all_findings
    assert [r.path for r in report.parents] == [str(base)]


def test_check_zeroed_and_discarded_blocks_keep_their_space_referenced(dynamic):
    with vhdx.open(dynamic, writable=True) as image:
        image.write_zeros(0, MiB)
        image.discard(MiB, MiB)
    report = check_image(dynamic)
    assert report.exit_code == 0, report.all_findings


@pytest.mark.parametrize("name", ["dfvfs/ntfs-fixed.vhdx.gz", "dissect.hypervisor/dynamic.vhdx.gz",
                                  "discutils/xfs.vhdx.gz", "dfvfs/fat-parent.vhdx.gz"])
def test_check_windows_made_images_are_clean(corpus_image, name):
    report = check_image(corpus_image(name))
    assert report.exit_code == 0, report.all_findings


def test_check_disk2vhd_equal_sequences_is_a_warning_only(corpus_image):
    report = check_image(corpus_image("qemu-iotests/test-disk2vhd.vhdx.bz2"))
    assert findings(report, "HEADER_SEQUENCE_TIE") == [(c.HEADER_OFFSETS[1], "warning")]
    assert not report.errors


# --- headers ----------------------------------------------------------------------------------------
def test_check_flipped_header_crc_names_that_copy(dynamic):
    other = 1 - current_header_index(dynamic)
    offset = c.HEADER_OFFSETS[other]
    pwrite(dynamic, offset + 4, bytes([pread(dynamic, offset + 4, 1)[0] ^ 1]))
    report = check_image(dynamic)
    assert findings(report, "HEADER_CHECKSUM") == [(offset, "error")]
    assert report.find("HEADER_CHECKSUM")[0].repairable
    assert report.exit_code == 2


def test_check_stale_second_header_is_info_not_a_warning(dynamic):
    io = ImageIO.open(dynamic)
    headers = load_headers(io)
    io.close()
    other = headers.other_copy
    stale = replace(headers.current, sequence_number=headers.current.sequence_number - 5,
                    file_write_guid=uuid.uuid4())
    pwrite(dynamic, other.offset, stale.to_bytes())
    report = check_image(dynamic)
    assert findings(report, "HEADER_STALE") == [(other.offset, "info")]
    assert report.exit_code == 0


def test_check_both_headers_bad_has_no_current(dynamic):
    for offset in c.HEADER_OFFSETS:
        pwrite(dynamic, offset, b"XXXX")
    report = check_image(dynamic)
    assert findings(report, "HEADER_SIGNATURE") == [(c.HEADER_OFFSETS[0], "error"), (c.HEADER_OFFSETS[1], "error")]
    assert findings(report, "HEADER_NO_CURRENT") == [(c.HEADER_OFFSETS[0], "error")]


# --- log ----------------------------------------------------------------------------------------------
def test_check_dirty_log_corpus_image(corpus_image):
    report = check_image(corpus_image("qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2"))
    # The header names the GUID of the entry with sequence 7, the second 4 KiB sector pair of the log at 1 MiB.
    assert findings(report, "LOG_DIRTY") == [(0x10C000, "error")]
    assert report.exit_code == 2


def test_check_dirty_log_is_checked_as_replayed(dynamic):
    # The logged sector puts reserved bits in BAT entry 0: seen only if the check looks through the log.
    sector = bytearray(pread(dynamic, BAT_OFFSET, 4096))
    sector[0:8] = struct.pack("<Q", struct.unpack("<Q", sector[0:8])[0] | 0x8)
    make_dirty(dynamic, [DataWrite(BAT_OFFSET, bytes(sector))])
    report = check_image(dynamic)
    assert findings(report, "LOG_DIRTY") == [(LOG_OFFSET, "error")]
    assert findings(report, "BAT_RESERVED_BITS") == [(BAT_OFFSET, "warning")]


def test_check_torn_log_entry_without_valid_sequence(dynamic):
    make_dirty(dynamic, [DataWrite(BAT_OFFSET, pread(dynamic, BAT_OFFSET, 4096))], torn=True)
    report = check_image(dynamic)
    assert findings(report, "LOG_TORN_ENTRY") == [(LOG_OFFSET, "warning")]
    assert findings(report, "LOG_NO_VALID_SEQUENCE") == [(LOG_OFFSET, "warning")]
    assert "LOG_DIRTY" not in report.codes()


def test_check_log_shorter_file_than_flushed_offset_is_truncated(dynamic):
    make_dirty(dynamic, [DataWrite(BAT_OFFSET, pread(dynamic, BAT_OFFSET, 4096))])
    os.truncate(dynamic, os.path.getsize(dynamic) - MiB)
    report = check_image(dynamic)
    assert findings(report, "LOG_TRUNCATED") == [(LOG_OFFSET, "error")]


# --- region tables and metadata -------------------------------------------------------------------
def test_check_region_table_copy_checksum(dynamic):
    pwrite(dynamic, c.REGION_TABLE_OFFSETS[1] + 100, b"\xff")
    report = check_image(dynamic)
    assert findings(report, "REGION_TABLE_CHECKSUM") == [(c.REGION_TABLE_OFFSETS[1], "error")]
    assert report.find("REGION_TABLE_CHECKSUM")[0].repairable


def test_check_region_beyond_eof_on_truncated_file(dynamic):
    os.truncate(dynamic, BAT_OFFSET + MiB // 2)
    report = check_image(dynamic)
    # The BAT region entry is the first entry of each copy (16 bytes into the table).
    assert (c.REGION_TABLE_OFFSETS[0] + 16, "error") in findings(report, "REGION_BEYOND_EOF")


def test_check_file_shorter_than_header_section(dynamic):
    os.truncate(dynamic, 300 * 1024)
    report = check_image(dynamic)
    assert findings(report, "FILE_TRUNCATED")[0] == (300 * 1024, "error")
    assert report.exit_code == 2


def test_check_metadata_signature(dynamic):
    pwrite(dynamic, METADATA_OFFSET, b"metadatX")
    report = check_image(dynamic)
    assert findings(report, "METADATA_SIGNATURE") == [(METADATA_OFFSET, "error")]
    assert report.find("METADATA_SIGNATURE")[0].repairable


def test_check_metadata_flags_differ_from_spec(dynamic):
    # First table entry (File Parameters): flags at byte 24 of the 32-byte entry after the 32-byte header.
    pwrite(dynamic, METADATA_OFFSET + 32 + 24, struct.pack("<I", 0))
    report = check_image(dynamic)
    assert findings(report, "METADATA_FLAGS") == [(METADATA_OFFSET + 32, "warning")]


def test_check_not_a_vhdx_could_not_check(tmp_path):
    path = tmp_path / "raw.img"
    path.write_bytes(bytes(4096))
    report = check_image(path)
    assert report.exit_code == 1
    assert report.codes() == ["NOT_VHDX"]


# --- BAT ----------------------------------------------------------------------------------------------
def test_check_bat_entry_beyond_eof(dynamic):
    at = set_bat_entry(dynamic, 1, (500 << 20) | c.BatState.FULLY_PRESENT)
    report = check_image(dynamic)
    assert findings(report, "BAT_BEYOND_EOF") == [(at, "error")]


def test_check_overlapping_blocks_names_both_entries(dynamic):
    at = set_bat_entry(dynamic, 5, bat_entry(dynamic, 0))
    report = check_image(dynamic)
    assert sorted(findings(report, "BAT_OVERLAP")) == [(BAT_OFFSET, "error"), (at, "error")]


def test_check_block_over_metadata_region(dynamic):
    at = set_bat_entry(dynamic, 1, METADATA_OFFSET | c.BatState.FULLY_PRESENT)
    report = check_image(dynamic)
    assert findings(report, "BAT_OVERLAPS_STRUCTURE") == [(at, "error")]


def test_check_partially_present_in_dynamic_disk_is_illegal(dynamic):
    at = set_bat_entry(dynamic, 0, bat_entry(dynamic, 0) | c.BatState.PARTIALLY_PRESENT)
    report = check_image(dynamic)
    assert findings(report, "BAT_STATE_ILLEGAL") == [(at, "error")]


def test_check_missing_sector_bitmap(tmp_path):
    base = make_dynamic(tmp_path / "base.vhdx")
    child = make_child(base, tmp_path / "child.avhdx")
    with vhdx.open(child) as image:
        g = image.geometry
        sb_index = int(g.bitmap_index(0))
        bat_offset = image.bat.file_offset
    pwrite(child, bat_offset + 8 * sb_index, bytes(8))
    report = check_image(child)
    assert findings(report, "BAT_BITMAP_MISSING") == [(bat_offset + 8 * sb_index, "error")]


def test_check_many_bad_entries_are_summed_up(tmp_path):
    path = make_dynamic(tmp_path / "d.vhdx", blocks=(), size=64 * MiB)
    for i in range(40):
        set_bat_entry(path, i, (900 << 20) | c.BatState.FULLY_PRESENT)
    report = check_image(path)
    listed = [f for f in report.find("BAT_BEYOND_EOF") if f.structure != "summary"]
    summary = [f for f in report.find("BAT_BEYOND_EOF") if f.structure == "summary"]
    assert len(listed) == 32
    assert "8 more" in summary[0].message


# --- chain ------------------------------------------------------------------------------------------
def test_check_wrong_parent_linkage(tmp_path):
    base = make_dynamic(tmp_path / "base.vhdx")
    child = make_child(base, tmp_path / "child.avhdx")
    with vhdx.open(base, writable=True, force=True) as image:  # a write gives the parent a new DataWriteGuid
        image.write(0, b"x" * 512)
    report = check_image(child)
    assert [f.code for f in report.errors] == ["PARENT_MISMATCH"]
    assert report.errors[0].offset > METADATA_OFFSET


def test_check_parent_moved(tmp_path):
    base = make_dynamic(tmp_path / "base.vhdx")
    child = make_child(base, tmp_path / "child.avhdx")
    (tmp_path / "elsewhere").mkdir()
    base.rename(tmp_path / "elsewhere" / "base.vhdx")
    report = check_image(child)
    assert [f.code for f in report.errors] == ["PARENT_NOT_FOUND"]


def test_check_chain_loop(tmp_path):
    base = make_dynamic(tmp_path / "base.vhdx")
    a = make_child(base, tmp_path / "a.avhdx")
    b = make_child(a, tmp_path / "b.avhdx")
    set_parent(a, b, ignore_id_mismatch=True)
    report = check_image(b, chain=True)
    assert "CHAIN_LOOP" in report.codes()
    assert report.exit_code == 2


def test_check_parent_with_other_sector_size(tmp_path):
    base = make_dynamic(tmp_path / "base.vhdx")
    child = make_child(base, tmp_path / "child.avhdx")
    other = tmp_path / "other.vhdx"
    create(other, SIZE, block_size=MiB, logical_sector_size=4096)
    report = check_image(child, parent=other, ignore_id_mismatch=True)
    assert [f.code for f in report.errors] == ["CHAIN_SECTOR_SIZE"]


# --- leaks ----------------------------------------------------------------------------------------
def test_check_trailing_space_is_a_repairable_leak(dynamic):
    size = os.path.getsize(dynamic)
    os.truncate(dynamic, size + 3 * MiB)
    report = check_image(dynamic)
    assert findings(report, "LEAKED_SPACE") == [(size, "leak")]
    assert report.find("LEAKED_SPACE")[0].repairable
    assert report.leaked_bytes == 3 * MiB
    assert report.exit_code == 3


def test_check_space_freed_inside_the_file_is_free_space_not_a_leak(dynamic):
    set_bat_entry(dynamic, 1, 0)
    report = check_image(dynamic)
    assert findings(report, "LEAKED_SPACE") == []
    assert report.free_bytes == MiB
    assert report.exit_code == 0


# --- interface --------------------------------------------------------------------------------------
def test_check_findings_use_known_codes_only(tmp_path, dynamic):
    set_bat_entry(dynamic, 5, bat_entry(dynamic, 0) | 0x10)
    pwrite(dynamic, c.HEADER_OFFSETS[0] + 8, b"\x01")
    assert all(code in CODES for code in check_image(dynamic).codes())


def test_check_cli_exit_codes_and_json(tmp_path, dynamic):
    runner = CliRunner()
    assert runner.invoke(cli, ["check", str(dynamic)]).exit_code == 0
    os.truncate(dynamic, os.path.getsize(dynamic) + MiB)
    result = runner.invoke(cli, ["check", "--json", str(dynamic)])
    assert result.exit_code == 3
    assert json.loads(result.output)["findings"][0]["code"] == "LEAKED_SPACE"
    set_bat_entry(dynamic, 5, bat_entry(dynamic, 0))
    assert runner.invoke(cli, ["check", str(dynamic)]).exit_code == 2
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * 1024)
    result = runner.invoke(cli, ["check", str(raw)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output


# --- the fixture library's named faults ---------------------------------------------------------------
def _fault_specs() -> list[str]:
    try:
        from vhdx_fixtures.spec import ready_spec_names
    except ImportError:
        return []
    return [name for name in ready_spec_names() if name.startswith("fault-")]


@pytest.mark.parametrize("spec_name", _fault_specs())
def test_check_reports_every_fixture_fault_with_code_and_offset(tmp_path, spec_name):
    from vhdx_fixtures.builder import build
    from vhdx_fixtures.spec import ready_spec

    build(ready_spec(spec_name), tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    files = {layer["name"]: Path(layer["path"]).name for layer in manifest["layers"]}
    for layer in manifest["layers"]:
        path = tmp_path / layer["path"]
        if not path.exists():
            continue  # a fault that moves a file away
        report = check_image(path, chain=True)
        got = {(f.code, f.offset, Path(f.path).name) for f in report.all_findings}
        for expected in layer["check"]:
            assert (expected["code"], expected["offset"], files[expected["file"]]) in got, (layer["name"], got)


def test_check_copy_of_image_in_other_folder_is_independent(tmp_path, dynamic):
    copy = tmp_path / "copy" / "disk.vhdx"
    copy.parent.mkdir()
    shutil.copy(dynamic, copy)
    assert check_image(copy).exit_code == 0


def test_check_bat_offset_that_wraps_negative_is_beyond_eof(dynamic):
    # Found by the fuzzer: FileOffsetMB near 2**44 MiB is past 2**63 bytes and wrapped negative in int64.
    at = set_bat_entry(dynamic, 0, 0xFFFFFFFFFFFFFFFE)
    report = check_image(dynamic)
    assert findings(report, "BAT_BEYOND_EOF") == [(at, "error")]


def test_check_empty_parent_locator_is_malformed_and_the_reader_refuses_it(tmp_path):
    # Found by the fuzzer: a differencing disk whose Parent Locator entry has length 0 crashed the reader.
    base = make_dynamic(tmp_path / "base.vhdx")
    child = make_child(base, tmp_path / "child.avhdx")
    with vhdx.open(child) as image:
        entry = next(e for e in image.metadata.entries if e.item_id == c.PARENT_LOCATOR_GUID)
    pwrite(child, entry.table_offset + 20, struct.pack("<I", 0))
    report = check_image(child)
    assert findings(report, "LOCATOR_MALFORMED") == [(entry.table_offset, "error")]
    with pytest.raises(vhdx.VhdxError):
        vhdx.open(child)
