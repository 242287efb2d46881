"""compact --mode quick on ext2/3/4 guests: blocks holding only free ext blocks are released, e2fsck -fn stays clean
and every kept file reads back the same; a volume whose bitmaps cannot be trusted or understood (journal to recover,
not cleanly unmounted, unknown incompatible feature, a bitmap failing its metadata_csum checksum) is kept whole with
the reason. Guests are made by mkfs.ext* -d and debugfs rm (frees the blocks, leaves their old bytes).
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from click.testing import CliRunner

import vhdx
from tests.test_compact_quick import (
    DELETED,
    MiB,
    deleted_blocks,
    free_bytes_read,
    guest_disk,
    kept_files,
    present_blocks,
    run,
    tool,
    volume_after,
)
from vhdx.format import ext
from vhdx.ops import guest_ext
from vhdx.ops.check import check_image
from vhdx.ops.compact import compact_image
from vhdx_cli.main import cli

pytest.importorskip("pytsk3", reason="compact --mode quick needs the guestfs extra")

LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


def ext_volume(tmp_path, size: int, fs: str, *options: str, block: int = 4096, deleted: int = 8 * MiB) -> str:
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    for name, data in {**kept_files(), "gone.bin": DELETED * (deleted // len(DELETED))}.items():
        (files / name).write_bytes(data)
    volume = tmp_path / f"{fs}.vol"
    volume.write_bytes(b"")
    os.truncate(volume, size)
    run(f"mkfs.{fs}", "-q", "-F", "-b", block, *options, "-d", files, volume)
    run("debugfs", "-w", "-R", "rm gone.bin", volume)
    return str(volume)


def free_blocks_e2fs(volume: str) -> tuple[int, int]:
    """(free blocks, block size) as dumpe2fs reads the volume."""
    fields = dict(line.split(":", 1) for line in run("dumpe2fs", "-h", volume, text=True).stdout.splitlines()
                  if ":" in line)
    return int(fields["Free blocks"]), int(fields["Block size"])


def e2fsck_clean(volume: str) -> None:
    result = os.system(f"{tool('e2fsck')} -fn {volume} >/dev/null 2>&1")
    assert result == 0, "e2fsck -fn found problems"


def kept_files_read_back(volume: str) -> None:
    for name, data in kept_files().items():
        assert run("debugfs", "-R", f"cat {name}", volume).stdout == data, name


GUESTS = {  # id: (fs, block size, mkfs options)
    "ext4": ("ext4", 4096, ()),
    "ext3": ("ext3", 4096, ()),
    "ext2": ("ext2", 4096, ()),
    "ext4-1k-many-groups": ("ext4", 1024, ()),
    "ext4-32bit-no-csum": ("ext4", 4096, ("-O", "^64bit,^metadata_csum")),
    "ext4-sparse_super2": ("ext4", 1024, ("-O", "sparse_super2")),
    "ext4-no-flex_bg": ("ext4", 1024, ("-O", "^flex_bg")),
}


@pytest.mark.parametrize("guest", list(GUESTS))
def test_quick_releases_ext_blocks_holding_only_free_blocks_and_keeps_the_volume_and_files(tmp_path, guest):
    fs, block, options = GUESTS[guest]
    volume = ext_volume(tmp_path, 40 * MiB, fs, *options, block=block)
    path = guest_disk(tmp_path, "gpt", [(1, volume, LINUX)], size=48 * MiB)
    free, size = free_blocks_e2fs(volume)
    assert free_bytes_read(path) == free * size
    deleted = deleted_blocks(path)
    assert len(deleted) >= 6
    before, file_before = present_blocks(path), os.path.getsize(path)
    result = compact_image(path, "quick")
    assert deleted <= before - present_blocks(path)
    assert result.free_blocks_released >= len(deleted)
    assert os.path.getsize(path) < file_before - 6 * MiB
    assert any(f"{fs}, " in line for line in result.guest)
    report = check_image(path)
    assert report.exit_code == 0, [str(f) for f in report.all_findings]
    after = volume_after(tmp_path, path, 1, 40 * MiB)
    e2fsck_clean(after)
    kept_files_read_back(after)


def uninit_groups(volume: str) -> int:
    with open(volume, "rb") as f:
        def read(offset, n):
            f.seek(offset)
            return f.read(n)

        vol = guest_ext.open_volume(read, 0, os.path.getsize(volume))
        return int(np.count_nonzero(guest_ext._descriptors(read, 0, vol)["flags"] & ext.BG_BLOCK_UNINIT))


def test_quick_counts_a_block_uninit_group_free_except_the_metadata_placed_in_it(tmp_path):
    # 1 KiB blocks: 8 MiB groups, most never written (BLOCK_UNINIT), with superblock backups (sparse_super) and,
    # through flex_bg, other groups' bitmaps and inode tables packed into group 0.
    volume = ext_volume(tmp_path, 64 * MiB, "ext4", block=1024, deleted=2 * MiB)
    assert uninit_groups(volume) >= 3
    path = guest_disk(tmp_path, "gpt", [(1, volume, LINUX)], size=72 * MiB)
    free, size = free_blocks_e2fs(volume)
    assert free_bytes_read(path) == free * size
    compact_image(path, "quick")
    after = volume_after(tmp_path, path, 1, 64 * MiB)
    e2fsck_clean(after)
    kept_files_read_back(after)


def test_quick_keeps_block_uninit_groups_of_a_meta_bg_volume_whole(tmp_path):
    # meta_bg places descriptor blocks in the groups themselves; that placement is not modelled, so such a group's
    # uninitialised bitmap is not trusted: less is found free, never more.
    volume = ext_volume(tmp_path, 64 * MiB, "ext4", "-O", "meta_bg,^resize_inode", block=1024, deleted=2 * MiB)
    assert uninit_groups(volume) >= 3
    path = guest_disk(tmp_path, "gpt", [(1, volume, LINUX)], size=72 * MiB)
    free, size = free_blocks_e2fs(volume)
    assert 0 < free_bytes_read(path) < free * size
    compact_image(path, "quick")
    after = volume_after(tmp_path, path, 1, 64 * MiB)
    e2fsck_clean(after)
    kept_files_read_back(after)


def assert_kept_whole(path: str, reason: str) -> None:
    before = present_blocks(path)
    with vhdx.open(path) as disk:
        content = disk.read(0, disk.virtual_size)
    result = compact_image(path, "quick")
    assert result.free_blocks_released == 0 and present_blocks(path) == before
    assert any("skipped" in line and reason in line for line in result.guest), result.guest
    with vhdx.open(path) as disk:
        assert disk.read(0, disk.virtual_size) == content


def patch_superblock(volume: str, offset: int, fmt: str, value: int) -> None:
    """Write a superblock field of a volume made without metadata_csum (so no checksum to restamp)."""
    with open(volume, "r+b") as f:
        f.seek(ext.SUPERBLOCK_OFFSET + offset)
        f.write(struct.pack(fmt, value))


def test_quick_keeps_an_ext_volume_whose_journal_needs_recovery(tmp_path):
    volume = ext_volume(tmp_path, 24 * MiB, "ext4")
    run("debugfs", "-w", "-R", "feature needs_recovery", volume)
    assert_kept_whole(guest_disk(tmp_path, "gpt", [(1, volume, LINUX)], size=32 * MiB), "needs recovery")


def test_quick_keeps_an_ext_volume_not_cleanly_unmounted(tmp_path):
    volume = ext_volume(tmp_path, 24 * MiB, "ext2")
    run("debugfs", "-w", "-R", "ssv state 0", volume)
    assert_kept_whole(guest_disk(tmp_path, "gpt", [(1, volume, LINUX)], size=32 * MiB), "not cleanly unmounted")


def test_quick_keeps_an_ext_volume_with_an_unknown_incompatible_feature(tmp_path):
    volume = ext_volume(tmp_path, 24 * MiB, "ext4", "-O", "^metadata_csum")
    with open(volume, "rb") as f:
        f.seek(ext.SUPERBLOCK_OFFSET + 0x60)
        (incompat,) = struct.unpack("<I", f.read(4))
    patch_superblock(volume, 0x60, "<I", incompat | 0x40000000)
    assert_kept_whole(guest_disk(tmp_path, "gpt", [(1, volume, LINUX)], size=32 * MiB),
                      "incompatible features 0x40000000")


def mark_last_block_used(volume: str, bitmap: int) -> None:
    """Set the bit of the volume's last block (free after mkfs) in the one group's block bitmap."""
    last = os.path.getsize(volume) // 4096 - 1
    with open(volume, "r+b") as f:
        f.seek(bitmap * 4096 + last // 8)
        byte = f.read(1)[0]
        assert not byte & 0x80
        f.seek(bitmap * 4096 + last // 8)
        f.write(bytes([byte | 0x80]))


def test_quick_keeps_an_ext_volume_whose_block_bitmap_fails_its_checksum(tmp_path):
    volume = ext_volume(tmp_path, 24 * MiB, "ext4")
    stats = run("dumpe2fs", volume, text=True).stdout
    bitmap = int(stats.split("Block bitmap at ")[1].split()[0])
    mark_last_block_used(volume, bitmap)  # safe for the guest, but not what was checksummed
    assert_kept_whole(guest_disk(tmp_path, "gpt", [(1, volume, LINUX)], size=32 * MiB),
                      "fails its checksum (metadata_csum)")


def test_quick_keeps_an_ext_volume_whose_bitmap_disagrees_with_its_free_count(tmp_path):
    volume = ext_volume(tmp_path, 24 * MiB, "ext4", "-O", "^metadata_csum")
    stats = run("dumpe2fs", volume, text=True).stdout
    bitmap = int(stats.split("Block bitmap at ")[1].split()[0])
    mark_last_block_used(volume, bitmap)  # the descriptor's free count is left as it was
    assert_kept_whole(guest_disk(tmp_path, "gpt", [(1, volume, LINUX)], size=32 * MiB), "disagrees with its free")


def test_ext_descriptor_record_type_follows_the_construct_layouts():
    for size in (ext.DESC_SIZE_32, ext.DESC_SIZE_64_MIN, 128):
        dtype = ext.descriptor_dtype(size)
        assert dtype.itemsize == size
        raw = bytes(range(size))
        record = np.frombuffer(raw, dtype=dtype)[0]
        low = ext.GroupDescriptor.parse(raw)
        assert record["flags"] == low.flags and record["block_bitmap_csum_lo"] == low.block_bitmap_csum_lo
        if size >= ext.DESC_SIZE_64_MIN:
            high = ext.GroupDescriptorHigh.parse(raw[ext.DESC_SIZE_32 :])
            assert record["block_bitmap_csum_hi"] == high.block_bitmap_csum_hi
            assert record["inode_table_hi"] == high.inode_table_hi


@pytest.mark.parametrize(("flags", "groups"), [
    (0, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}),  # no sparse_super: every group
    (ext.RO_COMPAT_SPARSE_SUPER, {0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125}),
])
def test_superblock_backups_sit_in_group_0_1_and_powers_of_3_5_7_under_sparse_super(flags, groups):
    sb = ext.Superblock.parse(bytes(ext.SUPERBLOCK_SIZE))
    sb.feature_ro_compat = flags
    vol = guest_ext.ExtVolume(sb, 4096, 1 << 20, 126, 32, 0)
    limit = max(groups) + 1
    assert {g for g in range(limit) if vol.has_super(g)} == groups


def test_superblock_backups_sit_only_in_the_two_named_groups_under_sparse_super2():
    sb = ext.Superblock.parse(bytes(ext.SUPERBLOCK_SIZE))
    sb.feature_ro_compat = ext.RO_COMPAT_SPARSE_SUPER
    sb.feature_compat = ext.COMPAT_SPARSE_SUPER2
    sb.backup_bgs = [1, 40]
    vol = guest_ext.ExtVolume(sb, 4096, 1 << 20, 41, 32, 0)
    assert {g for g in range(41) if vol.has_super(g)} == {0, 1, 40}


def test_a_hostile_ext_geometry_with_too_many_groups_is_refused_before_reading_them():
    raw = bytearray(ext.SUPERBLOCK_SIZE)
    sb = ext.Superblock.parse(bytes(raw))
    sb.update(dict(magic=ext.MAGIC, log_block_size=0, first_data_block=1, blocks_per_group=8, clusters_per_group=8,
              feature_incompat=ext.INCOMPAT_64BIT, desc_size=64, blocks_count_lo=0, blocks_count_hi=1,
              rev_level=1, inode_size=256, state=ext.STATE_VALID))
    image = bytes(ext.SUPERBLOCK_OFFSET) + ext.Superblock.build(sb)
    reads = []

    def read(offset, n):
        reads.append(n)
        return image[offset : offset + n]

    vol = guest_ext.open_volume(read, 0, 1 << 45)
    with pytest.raises(ValueError, match="descriptor table larger than quick reads"):
        guest_ext.free_ranges(read, 0, vol)
    assert reads == [ext.SUPERBLOCK_SIZE]


def test_quick_keeps_a_bigalloc_ext_volume_whose_bitmap_bits_are_clusters(tmp_path):
    volume = ext_volume(tmp_path, 24 * MiB, "ext4", "-O", "bigalloc", "-C", "16384")
    assert_kept_whole(guest_disk(tmp_path, "gpt", [(1, volume, LINUX)], size=32 * MiB),
                      "read-only-compatible features 0x200")


def test_quick_cli_lists_the_ext_volume_and_what_it_released(tmp_path):
    volume = ext_volume(tmp_path, 24 * MiB, "ext4")
    path = guest_disk(tmp_path, "dos", [(1, volume, "83")], size=32 * MiB)
    out = CliRunner().invoke(cli, ["compact", path, "--mode", "quick"])
    assert out.exit_code == 0, out.output
    assert "mbr partition table" in out.output and "ext4, " in out.output and "MiB in free clusters" in out.output
