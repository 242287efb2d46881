"""``repair``: repairable faults end clean and read the bytes they held; the rest is refused with a reason.

The crash test runs a repair through an ImageIO that tears its N-th write (or fails its N-th flush/truncate)
for every N, then checks the file still opens and a plain second repair finishes the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_check import (
    BAT_OFFSET,
    LOG_OFFSET,
    METADATA_OFFSET,
    MiB,
    bat_entry,
    make_child,
    make_dirty,
    make_dynamic,
    pread,
    pwrite,
    set_bat_entry,
)

import vhdx
from vhdx.errors import VhdxError
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.ops.check import check_image
from vhdx.ops.repair import apply_repair, plan_repair, repair_image
from vhdx.structures.header import load_headers
from vhdx.structures.log import DataWrite
from vhdx_cli.main import cli

DIRTY_LOG = "qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2"
DIRTY_LOG_SHA256 = "179cefe8b0587f123393eedf2aa7aa8d25798591178e6bc3950a09762f38f96f"
QEMU_IMG = shutil.which("qemu-img")


def disk_bytes(path) -> bytes:
    with vhdx.open(path) as image:
        return image.read(0, image.virtual_size)


def disk_sha256(path) -> str:
    digest = hashlib.sha256()
    with vhdx.open(path) as image:
        buf = bytearray(16 * MiB)
        offset = 0
        while n := image.readinto(offset, buf):
            digest.update(memoryview(buf)[:n])
            offset += n
    return digest.hexdigest()


def qemu_check(path) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG, "check", "-f", "vhdx", str(path)], capture_output=True, text=True)


def assert_repaired(path, expected: bytes, *, qemu: bool = True) -> None:
    report = check_image(path)
    assert report.exit_code == 0, report.all_findings
    assert disk_bytes(path) == expected
    if qemu and QEMU_IMG:
        result = qemu_check(path)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def dynamic(tmp_path) -> Path:
    return make_dynamic(tmp_path / "disk.vhdx")


def other_header(path) -> int:
    io = ImageIO.open(path)
    try:
        return load_headers(io).other_copy.offset
    finally:
        io.close()


# --- repairable faults --------------------------------------------------------------------------------
def test_repair_flipped_header_crc(dynamic):
    expected = disk_bytes(dynamic)
    offset = other_header(dynamic)
    pwrite(dynamic, offset + 4, bytes([pread(dynamic, offset + 4, 1)[0] ^ 1]))
    result = repair_image(dynamic)
    assert [a.kind for a in result.plan] == ["restore_header"]
    assert any(f"at {offset:#x}" in line for line in result.changes)
    assert_repaired(dynamic, expected)


def test_repair_leaves_an_older_header_copy_alone(dynamic):
    expected = disk_bytes(dynamic)
    io = ImageIO.open(dynamic)
    headers = load_headers(io)
    io.close()
    stale = replace(headers.current, sequence_number=1, file_write_guid=uuid.uuid4())
    pwrite(dynamic, headers.other_copy.offset, stale.to_bytes())
    result = repair_image(dynamic)
    assert not result.plan.actions  # normal after any header update: nothing to repair
    assert check_image(dynamic).exit_code == 0
    assert_repaired(dynamic, expected)


def test_repair_region_table_copy(dynamic):
    expected = disk_bytes(dynamic)
    pwrite(dynamic, c.REGION_TABLE_OFFSETS[0] + 200, b"\x55")
    result = repair_image(dynamic)
    assert result.changes == (f"Region Table 1 at {c.REGION_TABLE_OFFSETS[0]:#x}: overwritten with Region Table 2",)
    assert pread(dynamic, c.REGION_TABLE_OFFSETS[0], 65536) == pread(dynamic, c.REGION_TABLE_OFFSETS[1], 65536)
    assert_repaired(dynamic, expected)


def test_repair_metadata_signature_and_flags_through_the_log(dynamic):
    expected = disk_bytes(dynamic)
    pwrite(dynamic, METADATA_OFFSET, b"metadatX")
    pwrite(dynamic, METADATA_OFFSET + 32 + 24, struct.pack("<I", 0))
    with pytest.raises(VhdxError):
        vhdx.open(dynamic)
    result = repair_image(dynamic)
    assert [a.kind for a in result.plan] == ["rewrite_metadata_table"]
    assert_repaired(dynamic, expected)


def test_repair_reserved_bat_bits(dynamic):
    expected = disk_bytes(dynamic)
    set_bat_entry(dynamic, 1, bat_entry(dynamic, 1) | 0x40)
    repair_image(dynamic)
    assert bat_entry(dynamic, 1) & c.BAT_RESERVED_MASK == 0
    assert_repaired(dynamic, expected)


def test_repair_dirty_log_written_by_us(dynamic):
    sector = bytearray(pread(dynamic, 4 * MiB, 4096))
    sector[:5] = b"hello"
    make_dirty(dynamic, [DataWrite(4 * MiB, bytes(sector))])
    expected = disk_bytes(dynamic)  # read-only open replays in memory
    assert expected[:5] == b"hello"
    repair_image(dynamic)
    assert_repaired(dynamic, expected)


def test_repair_torn_log_clears_it(dynamic):
    expected = disk_bytes(dynamic)
    make_dirty(dynamic, [DataWrite(BAT_OFFSET, pread(dynamic, BAT_OFFSET, 4096))], torn=True)
    result = repair_image(dynamic)
    assert [a.kind for a in result.plan] == ["clear_log"]
    assert_repaired(dynamic, expected)


def test_repair_corpus_dirty_log_replays_and_qemu_check_accepts_it(corpus_image, tmp_path):
    path = tmp_path / "dirty.vhdx"
    shutil.copyfile(corpus_image(DIRTY_LOG), path)
    repair_image(path)
    assert not check_image(path).errors
    assert disk_bytes_head(path) == b"\xa5" * (18 * MiB)
    if QEMU_IMG:
        assert qemu_check(path).returncode == 0


@pytest.mark.slow
def test_repair_corpus_dirty_log_then_qemu_accepts_it(corpus_image, tmp_path):
    original = corpus_image(DIRTY_LOG)
    path = tmp_path / "dirty.vhdx"
    shutil.copyfile(original, path)
    if QEMU_IMG:
        refused = qemu_check(original)
        assert refused.returncode != 0 and "log" in refused.stderr
    result = repair_image(path)
    assert [a.kind for a in result.plan] == ["replay_log"]
    report = check_image(path)
    assert not report.errors  # QEMU's own file leaves 8 MiB unreferenced inside it: leaks only
    assert disk_sha256(path) == DIRTY_LOG_SHA256
    if QEMU_IMG:
        assert qemu_check(path).returncode == 0
        raw = tmp_path / "out.raw"
        subprocess.run([QEMU_IMG, "convert", "-O", "raw", str(path), str(raw)], check=True)
        with open(raw, "rb") as f:
            assert f.read(18 * MiB) == b"\xa5" * (18 * MiB)


def test_repair_parent_moved_with_parent_option(tmp_path):
    base = make_dynamic(tmp_path / "base.vhdx")
    child = make_child(base, tmp_path / "child.avhdx")
    expected = disk_bytes(child)
    (tmp_path / "moved").mkdir()
    moved = base.rename(tmp_path / "moved" / "base.vhdx")
    refused = plan_repair(check_image(child))
    assert [r.code for r in refused.refusals] == ["PARENT_NOT_FOUND"]
    repair_image(child, parent=moved)
    assert check_image(child, chain=True).exit_code == 0
    assert disk_bytes(child) == expected


def test_repair_wrong_linkage_needs_ignore_id_mismatch(tmp_path):
    base = make_dynamic(tmp_path / "base.vhdx")
    child = make_child(base, tmp_path / "child.avhdx")
    with vhdx.open(base, writable=True, force=True) as image:  # forced: the child depends on it
        image.write(0, b"x" * 512)
    with pytest.raises(VhdxError):
        repair_image(child, parent=base)
    repair_image(child, parent=base, ignore_id_mismatch=True)
    assert check_image(child, chain=True).exit_code == 0


def test_repair_leaks_truncates_trailing_space(dynamic):
    expected = disk_bytes(dynamic)
    size = os.path.getsize(dynamic)
    os.truncate(dynamic, size + 2 * MiB)
    repair_image(dynamic)
    assert os.path.getsize(dynamic) == size + 2 * MiB  # not asked
    result = repair_image(dynamic, leaks=True)
    assert result.changes == (f"file: truncated from {size + 2 * MiB} to {size} bytes ({2 * MiB} leaked bytes at "
                              "the end released)",)
    assert os.path.getsize(dynamic) == size
    assert_repaired(dynamic, expected)


# --- refusals, dry run, backup ----------------------------------------------------------------------
def test_repair_refuses_overlapping_blocks_and_changes_nothing(dynamic):
    set_bat_entry(dynamic, 5, bat_entry(dynamic, 0))
    before = dynamic.read_bytes()
    result = repair_image(dynamic)
    assert {r.code for r in result.plan.refusals} == {"BAT_OVERLAP"}
    assert all("same space" in r.reason for r in result.plan.refusals)
    assert dynamic.read_bytes() == before
    assert result.exit_code == 2


def test_repair_refuses_everything_when_log_is_truncated(dynamic):
    make_dirty(dynamic, [DataWrite(BAT_OFFSET, pread(dynamic, BAT_OFFSET, 4096))])
    pwrite(dynamic, c.REGION_TABLE_OFFSETS[1] + 100, b"\x01")
    os.truncate(dynamic, os.path.getsize(dynamic) - MiB)
    plan = plan_repair(check_image(dynamic))
    assert plan.actions == ()
    assert [r.code for r in plan.refusals] == ["LOG_TRUNCATED"]


def test_repair_dry_run_changes_nothing(dynamic):
    pwrite(dynamic, c.REGION_TABLE_OFFSETS[1] + 100, b"\x01")
    before, mtime = dynamic.read_bytes(), os.stat(dynamic).st_mtime_ns
    result = repair_image(dynamic, dry_run=True)
    assert [a.kind for a in result.plan] == ["restore_region_table"]
    assert result.changes == ()
    assert dynamic.read_bytes() == before and os.stat(dynamic).st_mtime_ns == mtime


def test_repair_backup_keeps_the_broken_original(dynamic, tmp_path):
    pwrite(dynamic, c.REGION_TABLE_OFFSETS[1] + 100, b"\x01")
    before = dynamic.read_bytes()
    backup = tmp_path / "backup.vhdx"
    repair_image(dynamic, backup=backup)
    assert backup.read_bytes() == before
    assert check_image(dynamic).exit_code == 0
    with pytest.raises(VhdxError):
        repair_image(dynamic, backup=backup)  # never overwrites a backup


def test_repair_cli_prints_changes_and_exit_codes(dynamic):
    runner = CliRunner()
    pwrite(dynamic, c.REGION_TABLE_OFFSETS[1] + 100, b"\x01")
    dry = runner.invoke(cli, ["repair", "--dry-run", str(dynamic)])
    # The dry run exits as the real run will: the damage would be repaired.
    assert dry.exit_code == 0 and "would: overwrite the bad region table copy" in dry.output
    done = runner.invoke(cli, ["repair", "--json", str(dynamic)])
    assert done.exit_code == 0
    data = json.loads(done.output)
    assert data["changes"] == [f"Region Table 2 at {c.REGION_TABLE_OFFSETS[1]:#x}: overwritten with Region Table 1"]
    assert data["after"]["exit_code"] == 0
    bad = runner.invoke(cli, ["repair", "--ignore-id-mismatch", str(dynamic)])
    assert bad.exit_code == 1 and "needs --parent" in bad.output  # bad arguments: could not run


# --- crash safety ------------------------------------------------------------------------------------
class Crash(Exception):
    pass


class FaultyIO(ImageIO):
    """Tears the N-th write (half of it reaches the file), or fails the N-th flush/truncate."""

    def __init__(self, *args, fail_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail_at = fail_at
        self.calls = 0

    def _tick(self) -> bool:
        self.calls += 1
        return self.calls == self.fail_at

    def write_at(self, offset, data):
        if self._tick():
            view = memoryview(data).cast("B")
            super().write_at(offset, view[: len(view) // 2])
            raise Crash(f"torn write at {offset:#x}")
        return super().write_at(offset, data)

    def flush(self):
        if self._tick():
            raise Crash("flush failed")
        return super().flush()

    def truncate(self, size):
        if self._tick():
            raise Crash("truncate failed")
        return super().truncate(size)


def faulty_open(path, fail_at: int) -> FaultyIO:
    fd = os.open(path, os.O_RDWR)
    return FaultyIO(fd, None, path=str(path), writable=True, owns=True, fail_at=fail_at)


def broken_image(tmp_path, corpus_image) -> Path:
    """The corpus dirty-log image with a torn region table copy 1, bad metadata flags and trailing space."""
    path = tmp_path / "broken.vhdx"
    shutil.copyfile(corpus_image(DIRTY_LOG), path)
    pwrite(path, c.REGION_TABLE_OFFSETS[0] + 300, b"\x77")
    with vhdx.open(path) as image:
        meta = image.regions.metadata.file_offset
    pwrite(path, meta + 32 + 24, struct.pack("<I", 0))
    os.truncate(path, os.path.getsize(path) + 2 * MiB)
    return path


def test_repair_interrupted_at_every_write_point_can_be_finished(tmp_path, corpus_image):
    template = broken_image(tmp_path, corpus_image)
    plan = plan_repair(check_image(template), leaks=True)
    assert [a.kind for a in plan] == ["replay_log", "restore_region_table", "rewrite_metadata_table",
                                      "truncate_leak"]
    points = 0
    for fail_at in range(1, 200):
        path = tmp_path / f"run{fail_at}.vhdx"
        shutil.copyfile(template, path)
        io = faulty_open(path, fail_at)
        try:
            apply_repair(io, plan_repair(check_image(path), leaks=True))
            crashed = False
        except Crash:
            crashed = True
        finally:
            io.close()
        if not crashed:
            break
        points += 1
        with vhdx.open(path) as image:  # still opens (a replayable log is applied in memory)
            assert image.virtual_size == 10 * 1024 * MiB
        repair_image(path, leaks=True)
        report = check_image(path)
        assert not report.errors, (fail_at, report.all_findings)
        assert disk_bytes_head(path) == b"\xa5" * (18 * MiB)
        path.unlink()
    # every write, flush and truncate of the whole repair was interrupted once
    print(f"repair interrupted at {points} write points")
    assert points > 10


def disk_bytes_head(path) -> bytes:
    with vhdx.open(path) as image:
        return image.read(0, 18 * MiB)


@pytest.mark.slow
def test_repair_of_interrupted_corpus_repair_reads_manifest_sha256(tmp_path, corpus_image):
    path = broken_image(tmp_path, corpus_image)
    io = faulty_open(path, 4)
    with pytest.raises(Crash):
        apply_repair(io, plan_repair(check_image(path), leaks=True))
    io.close()
    repair_image(path, leaks=True)
    assert disk_sha256(path) == DIRTY_LOG_SHA256


def test_repair_interrupted_log_commit_leaves_a_replayable_log(dynamic):
    expected = disk_bytes(dynamic)
    pwrite(dynamic, METADATA_OFFSET, b"metadatX")
    plan = plan_repair(check_image(dynamic))
    # Writes: header (new FileWriteGuid), log entry, flush, header naming the log, flush, then the sector.
    for fail_at in range(1, 12):
        shutil.copyfile(dynamic, dynamic.with_suffix(".try"))
        io = faulty_open(dynamic.with_suffix(".try"), fail_at)
        try:
            apply_repair(io, plan)
        except Crash:
            pass
        finally:
            io.close()
        repair_image(dynamic.with_suffix(".try"))
        assert check_image(dynamic.with_suffix(".try")).exit_code == 0
        assert disk_bytes(dynamic.with_suffix(".try")) == expected
    assert LOG_OFFSET == c.HEADER_SECTION_SIZE
