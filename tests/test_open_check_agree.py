"""Open and check apply the same rules: a file the reader refuses names the finding code check reports for it.

Every fixture fault and every case the fuzzer found: ``vhdx.open`` (and the chain it resolves) either works or
raises a ``VhdxError`` whose ``.code`` is one of the error codes ``check`` reports for the same file; the CLI's
one-line error ends with that code in brackets.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from click.testing import CliRunner

import vhdx
from tests.fixtures.fixture_lists import FAULT_SPECS
from vhdx.errors import ChecksumError, FormatError, VhdxError
from vhdx.findings import CODES
from vhdx.format import checksum
from vhdx.format import constants as c
from vhdx.ops.check import check_image
from vhdx.ops.create import create
from vhdx_cli.main import cli

MiB = 1 << 20


def open_error(path) -> VhdxError | None:
    """The error opening ``path`` and resolving its whole chain gives, or None when it opens."""
    try:
        with vhdx.open(path) as image:
            image.layers  # noqa: B018 - the property resolves every parent
    except VhdxError as exc:
        return exc
    return None


def assert_agree(path, *, first: bool = False) -> VhdxError | None:
    """Open's refusal names an error code check reports (with ``first``: the first error check reports).

    Check lists a damaged structure's per-copy findings (e.g. each header's HEADER_CHECKSUM) before the verdict
    the reader stops on (HEADER_NO_CURRENT), so only single-fault files can demand the first finding.
    """
    report = check_image(path, chain=True)
    error = open_error(path)
    if error is not None:
        assert error.code in CODES, f"open raised {error!r} without a finding code"
        assert error.code in {f.code for f in report.errors}, (error.code, str(error), report.codes())
        if first:
            assert error.code == report.errors[0].code, (error.code, str(error), report.codes())
    return error


@pytest.mark.parametrize("name", FAULT_SPECS)
def test_open_refuses_each_fixture_fault_with_a_code_check_reports(name, vhdx_chain):
    chain = vhdx_chain(name)
    for layer in chain.manifest["layers"]:
        assert_agree(chain.paths[layer["name"]], first=True)


@pytest.fixture()
def dynamic(tmp_path):
    path = tmp_path / "d.vhdx"
    create(path, 8 * MiB, block_size=MiB)
    with vhdx.open(path, writable=True) as image:
        image.write(0, b"\x11" * (2 * MiB))
    return path


def bat_offset(path) -> int:
    with vhdx.open(path) as image:
        return image.regions.bat.file_offset


def set_bat_entry(path, index: int, value: int) -> None:
    at = bat_offset(path) + index * c.BAT_ENTRY_SIZE
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(struct.pack("<Q", value))


def test_bat_entry_past_2_to_the_62_is_beyond_eof_for_open_and_check(dynamic):
    # Found by the fuzzer: FileOffsetMB near 2**44 MiB wraps negative in int64; the reader called it
    # "inside the header section", check BAT_BEYOND_EOF. §2.5.1: the offset is past the end of the file.
    set_bat_entry(dynamic, 0, 0xFFFFFFFFFFFFFFFE)
    error = assert_agree(dynamic)
    assert error is not None and error.code == "BAT_BEYOND_EOF"


def test_bat_entry_inside_the_header_section_overlaps_a_structure_for_open_and_check(dynamic):
    set_bat_entry(dynamic, 0, c.BatState.FULLY_PRESENT)  # FileOffsetMB 0: the block would be the header section
    error = assert_agree(dynamic)
    assert error is not None and error.code == "BAT_OVERLAPS_STRUCTURE"


def test_bat_entry_with_an_illegal_state_is_refused_with_its_code(dynamic):
    set_bat_entry(dynamic, 0, 4)  # state 4 is undefined for payload entries
    error = assert_agree(dynamic)
    assert error is not None and error.code == "BAT_STATE_ILLEGAL"


def test_empty_parent_locator_is_locator_malformed_for_open_and_check(tmp_path):
    # Found by the fuzzer: a differencing disk whose Parent Locator entry has length 0 crashed the reader.
    parent, child = tmp_path / "p.vhdx", tmp_path / "c.avhdx"
    create(parent, 8 * MiB)
    create(child, parent=parent)
    with vhdx.open(child) as image:
        entry = next(e for e in image.metadata.entries if e.item_id == c.PARENT_LOCATOR_GUID)
    with open(child, "r+b") as f:
        f.seek(entry.table_offset + 16)
        f.write(struct.pack("<II", 0, 0))
    error = assert_agree(child)
    assert error is not None and error.code == "LOCATOR_MALFORMED"


def test_both_header_checksums_bad_raise_a_checksum_error_naming_no_current_header(dynamic):
    raw = bytearray(dynamic.read_bytes())
    for off in c.HEADER_OFFSETS:
        raw[off + 100] ^= 0xFF
    dynamic.write_bytes(bytes(raw))
    error = assert_agree(dynamic)
    assert isinstance(error, ChecksumError) and error.code == "HEADER_NO_CURRENT"


def test_a_failed_region_table_crc_raises_checksum_error(dynamic):
    raw = bytearray(dynamic.read_bytes())
    for off in c.REGION_TABLE_OFFSETS:
        raw[off + 200] ^= 0xFF
    dynamic.write_bytes(bytes(raw))
    error = assert_agree(dynamic)
    assert isinstance(error, ChecksumError) and isinstance(error, FormatError)
    assert error.code == "REGION_TABLE_CHECKSUM"


def test_a_restamped_region_table_with_a_missing_bat_agrees(dynamic):
    raw = bytearray(dynamic.read_bytes())
    for off in c.REGION_TABLE_OFFSETS:
        struct.pack_into("<I", raw, off + 8, 1)  # entry count 1: only the first region is left
        checksum.stamp(memoryview(raw)[off : off + c.REGION_TABLE_SIZE], c.REGION_TABLE_CHECKSUM_OFFSET)
    dynamic.write_bytes(bytes(raw))
    error = assert_agree(dynamic)
    assert error is not None and error.code == "REGION_MISSING"


def test_cli_error_of_a_refused_open_ends_with_the_finding_code(dynamic):
    set_bat_entry(dynamic, 0, 0xFFFFFFFFFFFFFFFE)
    result = CliRunner().invoke(cli, ["info", str(dynamic)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1
    assert len(lines) == 1 and lines[0].startswith("vhdx: error: ") and lines[0].endswith("[BAT_BEYOND_EOF]")


def test_every_code_is_a_plain_string_in_check_json(dynamic):
    set_bat_entry(dynamic, 0, 4)
    codes = [f["code"] for f in check_image(dynamic).to_json()["findings"]]
    assert codes and all(type(code) is str for code in codes)
    assert np.all([code in CODES for code in codes])


def test_a_file_that_is_not_vhdx_is_refused_as_not_vhdx(tmp_path):
    path = tmp_path / "other.vhdx"
    path.write_bytes(b"QFI\xfb" + bytes(4 << 20))
    error = assert_agree(path)
    assert error is not None and error.code == "NOT_VHDX"


@pytest.mark.parametrize("size", [64 << 10, 300 << 10, 2 * MiB + 4096])
def test_a_file_cut_short_is_refused_with_a_code_check_reports(dynamic, size):
    os.truncate(dynamic, size)
    error = assert_agree(dynamic)
    assert error is not None and type(error.code) is str
