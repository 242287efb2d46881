"""Crash safety of resize and compact: stopped at every write, flush or truncate, the disk opens and reads its old
or its new bytes, and ``--resume`` finishes to exactly the bytes of an uninterrupted run, checking clean; plus real
SIGKILLs of a ``vhdx compact`` process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import vhdx
from tests.support.faulty_io import DeadAfterCrash, SimulatedCrash
from tests.support.peers import need
from vhdx.ops import layout_journal
from vhdx.ops.check import check_image
from vhdx.ops.compact import compact_image
from vhdx.ops.create import create
from vhdx.ops.resize import resize_image

MiB = 1 << 20
GiB = 1 << 30


def read_head(path, limit: int = 16 * MiB) -> tuple[int, bytes]:
    with vhdx.open(path) as disk:
        return disk.virtual_size, disk.read(0, min(limit, disk.virtual_size))


def holey_disk(folder) -> str:
    """Dynamic, 1 MiB blocks: data, zero blocks and trimmed blocks interleaved, so every step has work."""
    path = str(folder / "disk.vhdx")
    create(path, 12 * MiB, block_size=MiB)
    with vhdx.open(path, writable=True) as disk:
        for i in range(12):
            disk.write(i * MiB, bytes([i + 1]) * MiB)
        disk.write(2 * MiB, bytes(2 * MiB))
        disk.discard(5 * MiB, MiB)
        disk.write(9 * MiB, bytes(MiB))
    return path


def grow_past_bat(path, opener=None, resume=False):
    resize_image(path, None if resume else 200 * GiB, opener=opener, resume=resume)


def shrink(path, opener=None, resume=False):
    resize_image(path, None if resume else 7 * MiB + 512, force=True, opener=opener, resume=resume)


def compact_full(path, opener=None, resume=False):
    compact_image(path, "full", opener=opener, resume=resume)


def fixed_disk(folder) -> str:
    path = str(folder / "disk.vhdx")
    create(path, 6 * MiB + 512, type="fixed", block_size=MiB)
    with vhdx.open(path, writable=True) as disk:
        disk.write(0, b"\x5f" * (6 * MiB + 512))
    return path


def child_disk(folder) -> str:
    """A differencing disk over a base with data: zero blocks over parent data stay, over parent zeros go."""
    base = str(folder / "base.vhdx")
    create(base, 8 * MiB, block_size=MiB)
    with vhdx.open(base, writable=True) as disk:
        disk.write(0, b"\x61" * (2 * MiB))
    path = str(folder / "disk.vhdx")
    create(path, parent=base, block_size=MiB)
    with vhdx.open(path, writable=True) as disk:
        for i in range(8):
            disk.write(i * MiB, bytes(MiB) if i in (1, 3, 4) else bytes([i + 7]) * MiB)
        disk.write(7 * MiB + 4096, b"\x01" * 512)
    return path


def qemu_disk(folder) -> str:
    """QEMU's layout: the metadata region right after the BAT, so a BAT that grows must move it."""
    path = str(folder / "disk.vhdx")
    subprocess.run([need("qemu-img"), "create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "8M"], check=True)
    with vhdx.open(path, writable=True) as disk:
        disk.write(0, b"\x71" * (3 * MiB))
    return path


def grow_fixed(path, opener=None, resume=False):
    resize_image(path, None if resume else 11 * MiB, opener=opener, resume=resume)


SCENARIOS = {"grow-past-bat": (holey_disk, grow_past_bat), "shrink": (holey_disk, shrink),
             "compact": (holey_disk, compact_full), "grow-fixed": (fixed_disk, grow_fixed),
             "compact-child": (child_disk, compact_full), "grow-moving-metadata": (qemu_disk, grow_past_bat)}


def count_operations(folder, make, action) -> int:
    path = make(folder)
    ios = []

    def opener(p):
        io = DeadAfterCrash.open_faulty(p, None)
        ios.append(io)
        return io

    action(path, opener)
    return sum(io.count for io in ios)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_crash_at_every_operation_reads_old_or_new_and_resume_finishes(tmp_path, scenario):
    make, action = SCENARIOS[scenario]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    count = count_operations(ref_dir, make, action)
    new = read_head(str(ref_dir / "disk.vhdx"))
    pristine_dir = tmp_path / "pristine"
    pristine_dir.mkdir()
    old = read_head(make(pristine_dir))
    assert count > 5
    # A compaction reads the same bytes before and after; what changes is the file's size.
    assert (old == new) == scenario.startswith("compact")
    new_file_size = os.path.getsize(ref_dir / "disk.vhdx")
    # Every result checks clean (the 4 MiB QEMU leaves after its metadata is free space, not a leak).
    assert check_image(str(ref_dir / "disk.vhdx"), chain=True).leaked_bytes == 0
    seen_new = set()
    for crash_at in range(count):
        work = tmp_path / f"run{crash_at}"
        shutil.copytree(pristine_dir, work)
        path = str(work / "disk.vhdx")
        with pytest.raises(SimulatedCrash):
            action(path, lambda p, n=crash_at: DeadAfterCrash.open_faulty(p, n))
        seen = read_head(path)  # read-only: a dirty log is replayed in memory only
        assert seen in (old, new), f"crash at operation {crash_at} gave neither the old nor the new bytes"
        seen_new.add(seen == new)
        assert os.path.exists(layout_journal.journal_path(path))
        action(path, resume=True)  # replays the log the crash left, cuts what the run had appended, finishes
        assert read_head(path) == new, f"resume after a crash at operation {crash_at}"
        assert os.path.getsize(path) == new_file_size
        report = check_image(path, chain=True)
        assert not report.errors and report.leaked_bytes == 0, (crash_at, [str(f) for f in report.all_findings])
        assert not os.path.exists(layout_journal.journal_path(path))
        shutil.rmtree(work)
    assert seen_new == ({True} if old == new else {False, True})


def _kill_script(path: str) -> list[str]:
    return [sys.executable, "-c", "from vhdx_cli.main import cli; cli()", "compact", path]


def test_sigkill_during_compact_leaves_a_disk_that_reads_the_same_and_resumes(tmp_path):
    """A real process killed at staggered moments: the disk still reads its bytes; --resume finishes."""
    source = tmp_path / "src"
    source.mkdir()
    path = str(source / "big.vhdx")
    create(path, 96 * MiB, block_size=MiB)
    with vhdx.open(path, writable=True) as disk:
        for i in range(0, 96, 2):
            disk.write(i * MiB, bytes([i % 251 + 1]) * MiB)
            disk.write((i + 1) * MiB, bytes(MiB))
    expected = read_head(path, 96 * MiB)
    for attempt, delay in enumerate((0.15, 0.3, 0.5, 0.8)):
        work = tmp_path / f"kill{attempt}"
        shutil.copytree(source, work)
        target = str(work / "big.vhdx")
        proc = subprocess.Popen(_kill_script(target), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert read_head(target, 96 * MiB) == expected, f"killed after {delay}s"
        if os.path.exists(layout_journal.journal_path(target)):
            compact_image(target, resume=True)
        else:
            compact_image(target)  # finished, or killed before it started: a fresh run is what is left
        assert read_head(target, 96 * MiB) == expected
        assert check_image(target).exit_code == 0
        assert os.path.getsize(target) <= 56 * MiB
        shutil.rmtree(work)
