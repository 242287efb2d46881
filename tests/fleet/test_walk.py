from __future__ import annotations

import os

from vhdx.fleet.walk import Walker
from vhdx_fixtures.fleet import write_disk


def walk(roots, **kwargs):
    walker = Walker(roots, **kwargs)
    batches = list(walker.batches())
    return sorted(p for b in batches for p in b.disks), walker.report


def test_symlink_out_of_the_roots_is_skipped_and_listed(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    write_disk(str(tmp_path / "outside" / "secret.vhdx"))
    os.symlink(tmp_path / "outside", tmp_path / "root" / "link")
    os.symlink(tmp_path / "outside" / "secret.vhdx", tmp_path / "root" / "file.vhdx")
    disks, report = walk([tmp_path / "root"])
    assert disks == []
    assert sorted(report.skipped_links) == [str(tmp_path / "root" / "file.vhdx"), str(tmp_path / "root" / "link")]


def test_symlink_out_of_the_roots_is_followed_when_asked(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    write_disk(str(tmp_path / "outside" / "a.vhdx"))
    os.symlink(tmp_path / "outside", tmp_path / "root" / "link")
    disks, _ = walk([tmp_path / "root"], follow_symlinks=True)
    assert disks == [str(tmp_path / "root" / "link" / "a.vhdx")]


def test_symlink_inside_the_roots_is_not_scanned_twice(tmp_path):
    write_disk(str(tmp_path / "a.vhdx"))
    os.symlink(tmp_path / "a.vhdx", tmp_path / "b.vhdx")
    os.symlink(tmp_path, tmp_path / "loop")
    disks, report = walk([tmp_path], follow_symlinks=True)
    assert disks == [str(tmp_path / "a.vhdx")] and report.skipped_links == []


def test_directory_link_loop_out_of_the_roots_ends(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "out").mkdir()
    write_disk(str(tmp_path / "out" / "a.vhdx"))
    os.symlink(tmp_path / "out", tmp_path / "root" / "l1")
    os.symlink(tmp_path / "out", tmp_path / "out" / "again")
    disks, _ = walk([tmp_path / "root"], follow_symlinks=True)
    assert disks == [str(tmp_path / "root" / "l1" / "a.vhdx")]


def test_fifo_named_like_a_disk_is_counted_not_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.vhdx")
    disks, report = walk([tmp_path])
    assert disks == [] and report.special_files == [str(tmp_path / "pipe.vhdx")]


def test_files_given_as_roots_are_probed(tmp_path):
    write_disk(str(tmp_path / "a.vhdx"))
    disks, _ = walk([tmp_path / "a.vhdx"])
    assert disks == [str(tmp_path / "a.vhdx")]


def test_big_folder_is_split_into_batches(tmp_path):
    for i in range(5):
        write_disk(str(tmp_path / f"d{i}.vhdx"))
    batches = list(Walker([tmp_path], batch_files=2).batches())
    assert [len(b.disks) for b in batches] == [2, 2, 1]


def test_unreadable_folder_is_reported(tmp_path):
    disks, report = walk([tmp_path / "missing"])
    assert disks == [] and report.unreadable_dirs[0][0] == str(tmp_path / "missing")
