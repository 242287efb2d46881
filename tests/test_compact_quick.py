"""compact --mode quick: blocks that only hold free clusters of the guest's NTFS or FAT file system are released
(old bytes of deleted files included), the guest still checks clean (ntfsfix -n / fsck.fat -n), every remaining file
reads back the same, and nothing outside a file system quick read is released (partition table, gaps between
partitions, partitions of other types, file systems it cannot read or that were not cleanly unmounted). ext2/3/4
guests: tests/test_compact_quick_ext.py.

Guests are made by the real tools on plain files: mkfs.ntfs + ntfscp (ntfs-3g has no offline delete: ntfstruncate
to 0 frees a file's clusters and leaves their old bytes), mkfs.fat + mcopy + mdel, mkfs.ext4 -d + debugfs rm.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import vhdx
from tests.support.faulty_io import DeadAfterCrash, SimulatedCrash
from vhdx.errors import InvalidRequestError
from vhdx.format import constants as c
from vhdx.ops import guest_free, layout_journal
from vhdx.ops.check import check_image
from vhdx.ops.compact import compact_image
from vhdx.ops.convert import import_raw
from vhdx.ops.create import create
from vhdx.ops.export import export_raw
from vhdx.ops.guest_free import _fat_entries, read_free_map
from vhdx_cli.main import cli

pytest.importorskip("pytsk3", reason="compact --mode quick needs the guestfs extra")

MiB = 1 << 20
DELETED = b"DELETED!"  # the content of every deleted file: a block holding only this held only freed clusters


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(f"/usr/sbin/{name}") or shutil.which(f"/sbin/{name}")
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install ntfs-3g e2fsprogs dosfstools fdisk)")
    return path


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([tool(args[0]), *map(str, args[1:])], capture_output=True, check=True, **kwargs)


def kept_files() -> dict[str, bytes]:
    rng = np.random.default_rng(14)
    return {name: rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            for name, size in (("a.bin", 1_500_000), ("b.bin", 100_000), ("c.bin", 2_500_000))}


def ntfs_volume(tmp_path, size: int, keep: dict[str, bytes], deleted_size: int) -> str:
    volume = tmp_path / "ntfs.vol"
    volume.write_bytes(b"")
    os.truncate(volume, size)
    run("mkfs.ntfs", "-F", "-Q", "-q", volume)
    for name, data in {**keep, "gone.bin": DELETED * (deleted_size // len(DELETED))}.items():
        (tmp_path / name).write_bytes(data)
        run("ntfscp", "-q", volume, tmp_path / name, name)
    info = run("ntfsinfo", "-F", "gone.bin", volume, text=True).stdout
    inode = int(info.split("Dumping Inode ")[1].split()[0])
    run("ntfstruncate", volume, inode, 0)  # frees its clusters; their bytes stay
    return str(volume)


def ext4_volume(tmp_path, size: int, keep: dict[str, bytes], deleted_size: int, *, fs: str = "ext4",
                block: int = 4096) -> str:
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    for name, data in {**keep, "gone.bin": DELETED * (deleted_size // len(DELETED))}.items():
        (files / name).write_bytes(data)
    volume = tmp_path / f"{fs}.vol"
    volume.write_bytes(b"")
    os.truncate(volume, size)
    run(f"mkfs.{fs}", "-q", "-F", "-b", block, "-d", files, volume)
    run("debugfs", "-w", "-R", "rm gone.bin", volume)  # frees its blocks; their bytes stay
    return str(volume)


def guest_disk(tmp_path, label: str, volumes: list[tuple[int, str, str]], size: int = 64 * MiB) -> str:
    """A dynamic disk with a partition table: ``volumes`` are (first MiB, volume file, partition type); every byte
    outside the partitions past the table is garbage (it must never be released)."""
    raw = tmp_path / "guest.raw"
    with open(raw, "wb") as f:
        f.write(b"GAP!" * (size // 4))
    layout = "".join(f"start={first * 2048}, size={os.path.getsize(vol) // 512}, type={kind}\n"
                     for first, vol, kind in volumes)
    with open(raw, "r+b") as f:
        f.write(bytes(MiB))  # room for the table
    run("sfdisk", "-q", raw, input=f"label: {label}\n{layout}".encode())
    with open(raw, "r+b") as f:
        for first, vol, _kind in volumes:
            f.seek(first * MiB)
            with open(vol, "rb") as v:
                f.write(v.read())
    path = str(tmp_path / "guest.vhdx")
    import_raw(raw, path, block_size=MiB)
    return path


def deleted_blocks(path) -> set[int]:
    """Blocks of the disk that hold only deleted file bytes (so only free clusters)."""
    found = set()
    with vhdx.open(path) as disk:
        for block in range(disk.virtual_size // MiB):
            if disk.read(block * MiB, MiB) == DELETED * (MiB // len(DELETED)):
                found.add(block)
    return found


def present_blocks(path) -> set[int]:
    with vhdx.open(path) as disk:
        return set(np.flatnonzero(disk.bat.states == c.BatState.FULLY_PRESENT).tolist())


def free_bytes_read(path) -> int:
    """The free bytes quick finds in the disk's one file system."""
    with vhdx.open(path) as disk:
        (volume,) = read_free_map(disk).volumes
    assert not volume.skipped, volume.skipped
    return volume.free_bytes


def volume_after(tmp_path, path, first_mib: int, size: int) -> str:
    """The volume's bytes as the compacted disk reads them, in a file the guest tools can check."""
    raw = tmp_path / "after.raw"
    with vhdx.open(path) as disk:
        export_raw(disk, raw)
    volume = tmp_path / "after.vol"
    with open(raw, "rb") as f:
        f.seek(first_mib * MiB)
        volume.write_bytes(f.read(size))
    return str(volume)


@pytest.mark.parametrize("span", [guest_free.BITMAP_SPAN, 3])  # 3: $Bitmap read in many pieces
def test_quick_releases_ntfs_blocks_holding_only_free_clusters_and_keeps_the_volume_and_files(tmp_path, monkeypatch,
                                                                                             span):
    monkeypatch.setattr(guest_free, "BITMAP_SPAN", span)
    keep = kept_files()
    volume = ntfs_volume(tmp_path, 40 * MiB, keep, 8 * MiB)
    path = guest_disk(tmp_path, "dos", [(1, volume, "7")])
    info = run("ntfscluster", "-i", volume, text=True).stdout
    assert free_bytes_read(path) == int(info.split("bytes of free space")[1].split(":")[1].split()[0])
    deleted = deleted_blocks(path)
    assert len(deleted) >= 6  # the deleted file's old bytes fill whole blocks
    before = present_blocks(path)
    result = compact_image(path, "quick")
    released = before - present_blocks(path)
    assert deleted <= released
    assert result.free_blocks_released >= len(deleted)
    report = check_image(path)
    assert report.exit_code == 0, [str(f) for f in report.all_findings]
    after = volume_after(tmp_path, path, 1, 40 * MiB)
    assert "processed successfully" in run("ntfsfix", "-n", after, text=True).stdout
    for name, data in keep.items():
        assert run("ntfscat", after, name).stdout == data


def test_quick_reads_guests_with_no_dissect_module_importable(tmp_path, monkeypatch):
    # dissect is AGPL: the package may use it in tests only, never import it itself.
    for name in ("dissect", "dissect.extfs", "dissect.fat", "dissect.ntfs"):
        monkeypatch.setitem(sys.modules, name, None)
    volume = fat_volume(tmp_path, 16, 24 * MiB, dict(list(kept_files().items())[:1]), 8 * MiB)
    path = guest_disk(tmp_path, "dos", [(1, volume, "6")], size=26 * MiB)
    assert compact_image(path, "quick").free_blocks_released >= 6


def test_fat12_entries_are_unpacked_two_from_three_bytes():
    # Entries 0x123, 0x456, 0xFFF, 0x000 pack as 23 61 45 FF 0F 00.
    assert _fat_entries(bytes([0x23, 0x61, 0x45, 0xFF, 0x0F, 0x00]), 12).tolist() == [0x123, 0x456, 0xFFF, 0]


def test_quick_never_releases_the_partition_table_gaps_or_bytes_past_the_file_system(tmp_path):
    volume = fat_volume(tmp_path, 16, 16 * MiB + MiB // 2, kept_files(), 4 * MiB)
    # Gap: MiB 1; the file system ends in the middle of block 18, garbage after it up to the disk's end.
    path = guest_disk(tmp_path, "dos", [(2, volume, "6")], size=32 * MiB)
    outside = {0, 1, *range(18, 32)}
    assert outside <= present_blocks(path)
    assert compact_image(path, "quick").free_blocks_released >= 3  # the volume's own free blocks do go
    assert outside <= present_blocks(path)
    with vhdx.open(path) as disk:
        assert disk.read(MiB, MiB) == b"GAP!" * (MiB // 4)
        assert disk.read(31 * MiB, MiB) == b"GAP!" * (MiB // 4)


def test_quick_keeps_a_partition_whose_type_is_not_a_file_system_type(tmp_path):
    volume = ext4_volume(tmp_path, 24 * MiB, kept_files(), 8 * MiB)
    path = guest_disk(tmp_path, "dos", [(1, volume, "da")], size=32 * MiB)  # 0xda: non-FS data
    before = present_blocks(path)
    result = compact_image(path, "quick")
    assert result.free_blocks_released == 0 and present_blocks(path) == before
    assert any("partition type 0xda is not a file system type" in line for line in result.guest)


def fat_volume(tmp_path, bits: int, size: int, keep: dict[str, bytes], deleted_size: int) -> str:
    volume = tmp_path / "fat.vol"
    volume.write_bytes(b"")
    os.truncate(volume, size)
    run("mkfs.fat", "-F", bits, "-s", {12: 8, 16: 4, 32: 1}[bits], volume)
    for name, data in {**keep, "gone.bin": DELETED * (deleted_size // len(DELETED))}.items():
        (tmp_path / name).write_bytes(data)
        run("mcopy", "-i", volume, tmp_path / name, f"::{name}")
    run("mdel", "-i", volume, "::gone.bin")  # frees its clusters; their bytes stay
    return str(volume)


@pytest.mark.parametrize(("bits", "size"), [(12, 15 * MiB), (16, 24 * MiB), (32, 40 * MiB)])
def test_quick_releases_fat_blocks_holding_only_free_clusters_and_keeps_the_volume_and_files(tmp_path, bits, size):
    keep = dict(list(kept_files().items())[:2])
    volume = fat_volume(tmp_path, bits, size, keep, 8 * MiB)
    path = guest_disk(tmp_path, "dos", [(1, volume, "c" if bits == 32 else "6")], size=size + 2 * MiB)
    used, total = run("fsck.fat", "-n", volume, text=True).stdout.split()[-2].split("/")
    assert free_bytes_read(path) == (int(total) - int(used)) * {12: 8, 16: 4, 32: 1}[bits] * 512
    deleted = deleted_blocks(path)
    assert len(deleted) >= 6
    before = present_blocks(path)
    result = compact_image(path, "quick")
    assert deleted <= before - present_blocks(path)
    assert any(f"fat{bits}" in line for line in result.guest)
    after = volume_after(tmp_path, path, 1, size)
    run("fsck.fat", "-n", after)  # exit 0: clean
    for name, data in keep.items():
        assert run("mtype", "-i", after, f"::{name}").stdout == data


def test_quick_keeps_a_partition_without_a_file_system_it_reads_and_says_so(tmp_path):
    volume = tmp_path / "unknown.vol"
    volume.write_bytes(DELETED * (16 * MiB // len(DELETED)))
    path = guest_disk(tmp_path, "dos", [(1, str(volume), "83")], size=32 * MiB)
    before = present_blocks(path)
    result = compact_image(path, "quick")
    assert result.free_blocks_released == 0 and present_blocks(path) == before
    assert any("no file system The Sleuth Kit recognises" in line for line in result.guest)


def test_quick_refuses_a_disk_with_children_even_with_force(tmp_path):
    volume = ext4_volume(tmp_path, 24 * MiB, kept_files(), 8 * MiB)
    path = guest_disk(tmp_path, "dos", [(1, volume, "83")], size=32 * MiB)
    create(tmp_path / "child.avhdx", parent=path)
    with pytest.raises(InvalidRequestError, match="refused even when forced") as refused:
        compact_image(path, "quick", force=True)
    assert refused.value.hint == "mode_full"


def test_quick_changes_the_data_write_guid(tmp_path):
    volume = fat_volume(tmp_path, 16, 24 * MiB, dict(list(kept_files().items())[:1]), 8 * MiB)
    path = guest_disk(tmp_path, "dos", [(1, volume, "6")], size=32 * MiB)
    with vhdx.open(path) as disk:
        guid = disk.data_write_guid
    assert compact_image(path, "quick").free_blocks_released
    with vhdx.open(path) as disk:
        assert disk.data_write_guid != guid


def test_quick_cli_says_what_it_read_and_released(tmp_path):
    volume = fat_volume(tmp_path, 16, 24 * MiB, dict(list(kept_files().items())[:1]), 8 * MiB)
    path = guest_disk(tmp_path, "dos", [(1, volume, "6"), (26, volume, "da")], size=56 * MiB)
    out = CliRunner().invoke(cli, ["compact", path, "--mode", "quick", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "mbr partition table" in out.output and "fat16" in out.output
    assert "partition type 0xda is not a file system type" in out.output
    assert "would release" in out.output
    out = CliRunner().invoke(cli, ["compact", path, "--mode", "quick", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["mode"] == "quick" and report["free_blocks_released"] >= 6


def quick_crash_points(path) -> int:
    ios = []

    def opener(p):
        ios.append(DeadAfterCrash.open_faulty(p, None))
        return ios[-1]

    compact_image(path, "quick", opener=opener)
    return sum(io.count for io in ios)


def test_quick_interrupted_at_every_write_leaves_the_guest_intact_and_resume_finishes(tmp_path):
    keep = dict(list(kept_files().items())[:1])
    volume = fat_volume(tmp_path, 16, 24 * MiB, keep, 8 * MiB)
    pristine = guest_disk(tmp_path, "dos", [(1, volume, "6")], size=32 * MiB)
    reference = str(tmp_path / "reference.vhdx")
    shutil.copyfile(pristine, reference)
    count = quick_crash_points(reference)
    expected = present_blocks(reference)
    assert count > 5
    for crash_at in range(count):
        path = str(tmp_path / f"run{crash_at}.vhdx")
        shutil.copyfile(pristine, path)
        with pytest.raises(SimulatedCrash):
            compact_image(path, "quick", opener=lambda p, n=crash_at: DeadAfterCrash.open_faulty(p, n))
        assert os.path.exists(layout_journal.journal_path(path))
        compact_image(path, resume=True)
        assert present_blocks(path) == expected, crash_at
        report = check_image(path)
        assert report.exit_code == 0, (crash_at, [str(f) for f in report.all_findings])
        after = volume_after(tmp_path, path, 1, 24 * MiB)
        run("fsck.fat", "-n", after)  # exit 0: clean
        assert run("mtype", "-i", after, "::a.bin").stdout == keep["a.bin"], crash_at
        for leftover in (path, after, tmp_path / "after.raw"):
            os.unlink(leftover)


def test_quick_keeps_a_fat_volume_without_its_clean_shutdown_bit(tmp_path):
    volume = fat_volume(tmp_path, 16, 24 * MiB, dict(list(kept_files().items())[:1]), 8 * MiB)
    with open(volume, "r+b") as f:  # FAT entry 1, bit 15: clear = the volume was not cleanly unmounted
        reserved = int.from_bytes(f.read(16)[14:16], "little")
        f.seek(reserved * 512 + 3)
        byte = f.read(1)[0]
        f.seek(reserved * 512 + 3)
        f.write(bytes([byte & 0x7F]))
    path = guest_disk(tmp_path, "dos", [(1, volume, "6")], size=26 * MiB)
    result = compact_image(path, "quick")
    assert result.free_blocks_released == 0
    assert any("not cleanly unmounted" in line for line in result.guest)


def test_quick_keeps_a_fat_volume_with_more_fat_copies_than_it_can_compare(tmp_path):
    volume = tmp_path / "fat3.vol"
    volume.write_bytes(b"")
    os.truncate(volume, 24 * MiB)
    run("mkfs.fat", "-F", 16, "-f", 3, volume)  # The Sleuth Kit shows two FAT copies: the third would go unread
    path = guest_disk(tmp_path, "dos", [(1, str(volume), "6")], size=26 * MiB)
    before = present_blocks(path)
    result = compact_image(path, "quick")
    assert result.free_blocks_released == 0 and present_blocks(path) == before
    assert any("fat16 skipped" in line and "3 FATs" in line for line in result.guest)


def test_quick_keeps_overlapping_partitions(tmp_path):
    volume = ext4_volume(tmp_path, 24 * MiB, kept_files(), 8 * MiB)
    path = guest_disk(tmp_path, "dos", [(1, volume, "83")], size=32 * MiB)
    with vhdx.open(path, writable=True) as disk:  # a second entry over the same sectors
        mbr = bytearray(disk.read(0, 512))
        mbr[446 + 16 : 446 + 32] = mbr[446:462]
        disk.write(0, bytes(mbr))
    result = compact_image(path, "quick")
    assert result.free_blocks_released == 0
    assert sum("overlaps another partition" in line for line in result.guest) == 2


def test_quick_on_a_differencing_disk_does_not_read_the_guest_and_says_why(tmp_path):
    volume = ext4_volume(tmp_path, 24 * MiB, kept_files(), 8 * MiB)
    base = guest_disk(tmp_path, "dos", [(1, volume, "83")], size=32 * MiB)
    child = str(tmp_path / "child.avhdx")
    create(child, parent=base)
    with vhdx.open(child, writable=True) as disk:  # the child's copy of the deleted file's bytes
        disk.write(10 * MiB, disk.read(10 * MiB, MiB))
    result = compact_image(child, "quick")
    assert result.free_blocks_released == 0
    assert any("differencing disk" in line for line in result.guest)


def test_quick_without_the_guestfs_extra_says_how_to_install_it(tmp_path, monkeypatch):
    volume = ext4_volume(tmp_path, 24 * MiB, kept_files(), 8 * MiB)
    path = guest_disk(tmp_path, "dos", [(1, volume, "83")], size=32 * MiB)
    monkeypatch.setitem(sys.modules, "pytsk3", None)  # import fails as if not installed
    out = CliRunner().invoke(cli, ["compact", path, "--mode", "quick"])
    assert out.exit_code == 1 and "vhdx-chain[guestfs]" in out.output and "Traceback" not in out.output


def test_quick_keeps_an_ntfs_volume_marked_dirty(tmp_path):
    volume = ntfs_volume(tmp_path, 40 * MiB, kept_files(), 8 * MiB)
    run("ntfsresize", "-f", "-f", "-s", 36 * MiB, volume)  # leaves the dirty flag set, for chkdsk
    path = guest_disk(tmp_path, "dos", [(1, volume, "7")])
    result = compact_image(path, "quick")
    assert result.free_blocks_released == 0
    assert any("marked dirty" in line for line in result.guest)


def test_quick_keeps_an_ntfs_volume_of_a_hibernated_windows(tmp_path):
    volume = ntfs_volume(tmp_path, 40 * MiB, kept_files(), 8 * MiB)
    (tmp_path / "hiberfil.sys").write_bytes(b"HIBR" + bytes(65532))
    run("ntfscp", "-q", volume, tmp_path / "hiberfil.sys", "hiberfil.sys")
    path = guest_disk(tmp_path, "dos", [(1, volume, "7")])
    result = compact_image(path, "quick")
    assert result.free_blocks_released == 0
    assert any("hibernated" in line for line in result.guest)


def test_quick_with_an_unreadable_partition_table_reads_no_guest_and_says_why(tmp_path):
    volume = ext4_volume(tmp_path, 24 * MiB, kept_files(), 8 * MiB)
    path = guest_disk(tmp_path, "gpt", [(1, volume, "0FC63DAF-8483-4772-8E79-3D69D8477DE4")], size=32 * MiB)
    with vhdx.open(path, writable=True) as disk:  # neither the primary nor the backup GPT header's CRC matches
        for lba in (1, disk.virtual_size // 512 - 1):
            header = bytearray(disk.read(lba * 512, 512))
            header[16] ^= 0xFF
            disk.write(lba * 512, bytes(header))
    before = present_blocks(path)
    result = compact_image(path, "quick")
    assert result.free_blocks_released == 0 and present_blocks(path) == before
    assert any("partition table unreadable" in line for line in result.guest)


@pytest.mark.parametrize(("bits", "size"), [(12, 15 * MiB), (16, 24 * MiB), (32, 40 * MiB)])
def test_quick_reads_each_fat_copy_in_windows_of_at_most_fat_span_bytes(tmp_path, monkeypatch, bits, size):
    monkeypatch.setattr(guest_free, "FAT_SPAN", 1200)  # many windows, some ending inside a FAT12 pair's bytes
    reads = []
    window = guest_free._fat_window

    def recorded(table, offset, count):
        reads.append(count)
        return window(table, offset, count)

    monkeypatch.setattr(guest_free, "_fat_window", recorded)
    volume = fat_volume(tmp_path, bits, size, dict(list(kept_files().items())[:2]), 8 * MiB)
    path = guest_disk(tmp_path, "dos", [(1, volume, "c" if bits == 32 else "6")], size=size + 2 * MiB)
    used, total = run("fsck.fat", "-n", volume, text=True).stdout.split()[-2].split("/")
    assert free_bytes_read(path) == (int(total) - int(used)) * {12: 8, 16: 4, 32: 1}[bits] * 512
    assert len(reads) > 4 and max(reads) <= 1200
