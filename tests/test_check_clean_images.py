"""``check`` does not cry wolf: every untouched image made by Windows/Hyper-V, Disk2VHD, qemu-img and our own
writer exits 0; space between structures is free space, not a leak; only a tail of at least one block past
the last referenced byte (what a crash during block allocation leaves) is a leak (exit 3).
"""

from __future__ import annotations

import os
import subprocess

import pytest
from click.testing import CliRunner

import vhdx
from tests.support.peers import need
from vhdx.ops.check import check_image
from vhdx.ops.create import create
from vhdx.ops.repair import repair_image
from vhdx_cli.main import cli

MiB = 1 << 20

# Corpus images that must check clean as they are.
CLEAN_CORPUS = [
    "coreos-hyperv/config2_base.vhdx.bz2",
    "dfvfs/ext2.vhdx.gz",
    "dfvfs/fat-parent.vhdx.gz",
    "dfvfs/ntfs-dynamic.vhdx.gz",
    "dfvfs/ntfs-fixed.vhdx.gz",
    "discutils/btrfs.vhdx.gz",
    "discutils/swap.vhdx.gz",
    "discutils/xfs.vhdx.gz",
    "discutils/xfs5.vhdx.gz",
    "dissect.hypervisor/dynamic.vhdx.gz",
    "dissect.hypervisor/fixed.vhdx.gz",
    "qemu-iotests/test-disk2vhd.vhdx.bz2",
]
# Corpus images that are genuinely not clean, and why (each reason is checked below).
NOT_CLEAN_CORPUS = {
    # QEMU's iotest 070 sample: a dirty log that must be replayed (qemu-img check reports it too).
    "qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2": "LOG_DIRTY",
    # A Hyper-V checkpoint whose parent .avhdx was never published with it.
    "dissect.hypervisor/differencing.avhdx.gz": "PARENT_NOT_FOUND",
}

# (subformat, virtual size, block size or None for qemu-img's default)
QEMU_IMAGES = [
    ("dynamic", "1M", None), ("dynamic", "33M", None), ("dynamic", "1G", None), ("dynamic", "64M", "1M"),
    ("dynamic", "600M", "256M"), ("dynamic", "2T", "1M"), ("fixed", "1M", None), ("fixed", "100M", None),
    ("fixed", "50M", "8M"), ("fixed", "20M", "1M"),
]


def qemu_img_create(path, subformat: str, size: str, block_size: str | None, writes=()) -> str:
    opts = f"subformat={subformat}" + (f",block_size={block_size}" if block_size else "")
    subprocess.run([need("qemu-img"), "create", "-q", "-f", "vhdx", "-o", opts, str(path), size], check=True)
    for offset, length in writes:
        subprocess.run([need("qemu-io"), "-f", "vhdx", "-c", f"write -P 0x5a {offset} {length}", str(path)],
                       check=True, capture_output=True)
    return str(path)


@pytest.mark.parametrize("name", CLEAN_CORPUS)
def test_untouched_corpus_image_checks_clean(corpus_image, name):
    report = check_image(corpus_image(name), chain=True)
    assert report.exit_code == 0, [(f.code, f.message) for f in report.all_findings]
    assert not report.leaks


def test_windows_child_with_its_parent_checks_clean(corpus_image):
    corpus_image("dfvfs/fat-parent.vhdx.gz")
    report = check_image(corpus_image("dfvfs/fat-differential.vhdx.gz"), chain=True)
    assert report.exit_code == 0, [(f.code, f.message) for f in report.all_findings]


@pytest.mark.parametrize("name", sorted(NOT_CLEAN_CORPUS))
def test_damaged_corpus_image_says_why(corpus_image, name):
    report = check_image(corpus_image(name))
    assert report.exit_code == 2
    assert NOT_CLEAN_CORPUS[name] in [f.code for f in report.errors]
    assert not report.leaks


@pytest.mark.parametrize(("subformat", "size", "block_size"), QEMU_IMAGES)
def test_fresh_qemu_img_image_checks_clean(tmp_path, subformat, size, block_size):
    path = qemu_img_create(tmp_path / "q.vhdx", subformat, size, block_size)
    report = check_image(path)
    assert report.exit_code == 0, [(f.code, f.message) for f in report.all_findings]


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_qemu_io_written_image_checks_clean(tmp_path, subformat):
    path = qemu_img_create(tmp_path / "q.vhdx", subformat, "64M", "1M",
                           writes=[(0, 5 * MiB), (40 * MiB, MiB), (63 * MiB, 4096)])
    report = check_image(path)
    assert report.exit_code == 0, [(f.code, f.message) for f in report.all_findings]


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("block_size", [MiB, 32 * MiB])
def test_own_writer_image_checks_clean(tmp_path, fixed, block_size):
    path = tmp_path / "own.vhdx"
    create(path, 70 * MiB, block_size=block_size, type="fixed" if fixed else "dynamic")
    with vhdx.open(path, writable=True) as image:
        image.write(3 * MiB, b"\x11" * (2 * MiB))
        image.discard(0, block_size)
    report = check_image(path)
    assert report.exit_code == 0, [(f.code, f.message) for f in report.all_findings]


def test_qemu_gap_after_metadata_is_free_space_not_a_leak(tmp_path):
    path = qemu_img_create(tmp_path / "q.vhdx", "dynamic", "64M", "1M", writes=[(0, MiB)])
    report = check_image(path)
    assert report.free_bytes == 4 * MiB
    assert report.leaked_bytes == 0


def test_short_tail_is_free_space(tmp_path):
    path = tmp_path / "own.vhdx"
    create(path, 16 * MiB, block_size=2 * MiB)
    with vhdx.open(path, writable=True) as image:
        image.write(0, b"\x01" * MiB)
    size = os.path.getsize(path)
    os.truncate(path, size + 512)  # as Disk2VHD leaves
    report = check_image(path)
    assert report.exit_code == 0
    assert report.free_bytes == 512


def test_tail_of_one_block_past_the_last_referenced_byte_is_a_leak(tmp_path):
    path = tmp_path / "own.vhdx"
    create(path, 16 * MiB, block_size=2 * MiB)
    with vhdx.open(path, writable=True) as image:
        image.write(0, b"\x01" * MiB)
    size = os.path.getsize(path)
    os.truncate(path, size + 2 * MiB)
    report = check_image(path)
    assert report.exit_code == 3
    assert report.leaked_bytes == 2 * MiB
    assert [f.offset for f in report.leaks] == [size]


def test_tail_shorter_than_a_block_is_free_space(tmp_path):
    path = tmp_path / "own.vhdx"
    create(path, 64 * MiB, block_size=8 * MiB)
    with vhdx.open(path, writable=True) as image:
        image.write(0, b"\x01" * MiB)
    os.truncate(path, os.path.getsize(path) + 7 * MiB)
    report = check_image(path)
    assert report.exit_code == 0
    assert report.free_bytes == 7 * MiB


def test_qemu_fixed_disk_payload_space_is_neither_leaked_nor_free(tmp_path):
    path = qemu_img_create(tmp_path / "q.vhdx", "fixed", "20M", "1M")
    report = check_image(path)
    assert (report.leaked_bytes, report.free_bytes) == (0, 4 * MiB)  # only QEMU's gap after the metadata


def test_crash_leak_on_a_qemu_fixed_disk_is_found(tmp_path):
    path = qemu_img_create(tmp_path / "q.vhdx", "fixed", "20M", "1M")
    size = os.path.getsize(path)
    os.truncate(path, size + 2 * MiB)
    report = check_image(path)
    assert report.exit_code == 3
    assert [f.offset for f in report.leaks] == [size]


def test_repair_leaks_never_truncates_a_qemu_fixed_disk_payload(tmp_path):
    path = qemu_img_create(tmp_path / "q.vhdx", "fixed", "20M", "1M")
    size = os.path.getsize(path)
    result = repair_image(path, leaks=True)
    assert os.path.getsize(path) == size
    assert result.exit_code == 0
    os.truncate(path, size + 3 * MiB)
    repair_image(path, leaks=True)
    assert os.path.getsize(path) == size
    qemu_check = subprocess.run([need("qemu-img"), "check", "-f", "vhdx", path], capture_output=True, text=True)
    assert qemu_check.returncode == 0, qemu_check.stdout + qemu_check.stderr


def test_check_text_reports_free_space_in_bytes(tmp_path):
    path = qemu_img_create(tmp_path / "q.vhdx", "dynamic", "64M", "1M", writes=[(0, MiB)])
    result = CliRunner().invoke(cli, ["check", path])
    assert result.exit_code == 0, result.output
    assert "4194304 bytes of free space" in result.output
    assert "LEAKED_SPACE" not in result.output


# --- stale second header -------------------------------------------------------------------------------
def test_stale_second_header_is_not_a_warning(tmp_path):
    path = qemu_img_create(tmp_path / "q.vhdx", "dynamic", "64M", "1M", writes=[(0, MiB)])
    report = check_image(path)
    assert [f for f in report.all_findings if f.severity.value in ("warning", "error", "leak")] == []


def test_info_shows_the_older_header_copy(tmp_path):
    path = qemu_img_create(tmp_path / "q.vhdx", "dynamic", "64M", "1M", writes=[(0, MiB)])
    result = CliRunner().invoke(cli, ["info", path])
    assert result.exit_code == 0, result.output
    assert "older copy" in result.output
