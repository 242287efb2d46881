"""Crash safety of metadata updates: stopped at every write, flush or truncate, a file reads old or new.

Each scenario is run once to count its mutating operations, then once per operation with a crash right
there. After each crash the file must open (read-only: the log is replayed in memory), read exactly the
bytes from before or after the scenario, and read the same again after a writable open replays the log.
"""

from __future__ import annotations

import shutil

import pytest

import vhdx
from tests.support.faulty_io import DeadAfterCrash, SimulatedCrash
from vhdx.ops.create import create
from vhdx.ops.relink import set_parent
from vhdx.structures import commit as commit_module

MiB = 1 << 20
SIZE = 8 * MiB


def read_all(path) -> bytes:
    with vhdx.open(path) as disk:
        return disk.read(0, disk.virtual_size)


def base_disk(folder, name="base.vhdx"):
    path = folder / name
    create(path, SIZE, block_size=MiB)
    with vhdx.open(path, writable=True) as disk:
        disk.write(0, b"\x11" * (3 * MiB))
    return path


def child_disk(folder):
    parent = base_disk(folder)
    child = folder / "snap.avhdx"
    create(child, parent=parent, block_size=MiB)
    with vhdx.open(child, writable=True) as disk:
        disk.write(5 * MiB, b"\x22" * 4096)
    return child


def write_new_block(disk):
    disk.write(6 * MiB + 100, b"\x33" * 5000)


def write_partial_child_blocks(disk):
    disk.write(512 * 3, b"\x44" * 1024)  # NOT_PRESENT child block: partial, bitmap bits
    disk.write(5 * MiB + 8192, b"\x45" * 512)  # already partial block: more bits
    disk.write(7 * MiB, b"\x46" * MiB)  # whole block: fully present


def zero_and_discard(disk):
    disk.write_zeros(MiB, 2 * MiB)
    disk.discard(0, MiB)


def many_small_writes(disk):
    for i in range(6):
        disk.write(i * MiB + 4096 * i, bytes([i + 1]) * 4096)
        disk.flush()


SCENARIOS = {
    "dynamic-new-block": (base_disk, write_new_block),
    "child-partial-blocks": (child_disk, write_partial_child_blocks),
    "zero-and-discard": (base_disk, zero_and_discard),
    "child-many-commits": (child_disk, many_small_writes),
}


def run(path, action, crash_at):
    io = DeadAfterCrash.open_faulty(path, crash_at)
    disk = vhdx.open(io, writable=True)
    try:
        action(disk)
    finally:
        disk.close()
    return io.count


def count_operations(tmp_path, make, action) -> tuple[int, bytes, bytes]:
    ref = tmp_path / "ref"
    ref.mkdir()
    path = make(ref)
    old = read_all(path)
    count = run(path, action, None)
    return count, old, read_all(path)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_crash_at_every_operation_leaves_old_or_new_bytes(tmp_path, scenario):
    make, action = SCENARIOS[scenario]
    count, old, new = count_operations(tmp_path, make, action)
    assert old != new and count > 5
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    path = make(pristine)
    outcomes = set()
    for crash_at in range(count):
        work = tmp_path / f"run{crash_at}"
        shutil.copytree(pristine, work)
        target = work / path.name
        with pytest.raises(SimulatedCrash):
            run(target, action, crash_at)
        seen = read_all(target)  # read-only open: a dirty log is replayed in memory only
        if scenario == "child-many-commits":
            # Six separate commits: any prefix of them is a legal state; check it is a prefix.
            assert seen in prefix_states(tmp_path, make, action), f"crash at {crash_at}"
        else:
            assert seen in (old, new), f"crash at operation {crash_at} gave neither old nor new bytes"
        with vhdx.open(target, writable=True):
            pass  # replays the log to disk
        assert read_all(target) == seen, f"on-disk replay differs from in-memory replay (crash at {crash_at})"
        outcomes.add(seen == new)
        shutil.rmtree(work)
    assert outcomes == {False, True}


_PREFIX_CACHE: dict = {}


def prefix_states(tmp_path, make, action):
    """Bytes after 0..6 of the commits of many_small_writes (one write + flush each)."""
    if "states" not in _PREFIX_CACHE:
        folder = tmp_path / "prefixes"
        folder.mkdir()
        path = make(folder)
        states = [read_all(path)]
        for i in range(6):
            with vhdx.open(path, writable=True) as disk:
                disk.write(i * MiB + 4096 * i, bytes([i + 1]) * 4096)
            states.append(read_all(path))
        _PREFIX_CACHE["states"] = states
    return _PREFIX_CACHE["states"]


def test_crash_during_commit_split_into_several_log_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(commit_module, "max_entry_sectors", lambda log_length: 1)
    make, action = base_disk, zero_and_discard
    count, old, new = count_operations(tmp_path, make, action)
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    path = make(pristine)
    for crash_at in range(count):
        work = tmp_path / f"run{crash_at}"
        shutil.copytree(pristine, work)
        with pytest.raises(SimulatedCrash):
            run(work / path.name, action, crash_at)
        with vhdx.open(work / path.name, writable=True):
            pass
        # Each entry carries whole sectors, so every state is one the file would have had between entries.
        assert read_all(work / path.name)[:MiB * 3] in (old[: MiB * 3], new[: MiB * 3], bytes(MiB) + old[MiB: 3 * MiB],
                                                         old[:MiB] + bytes(2 * MiB)), f"crash at {crash_at}"
        shutil.rmtree(work)


def test_crash_while_relinking_a_parent_keeps_the_child_readable(tmp_path, monkeypatch):
    from vhdx.ops import relink as relink_module
    child = child_disk(tmp_path)
    moved = tmp_path / "moved.vhdx"
    shutil.copy(tmp_path / "base.vhdx", moved)
    expected = read_all(child)
    pristine = child.read_bytes()
    opened = []

    def open_child_faulty(path, *, writable=False, **kw):
        if not writable:
            return vhdx.open(path, **kw)
        io = DeadAfterCrash.open_faulty(path, crash_at)
        opened.append(io)
        return vhdx.open(io, writable=True, **kw)

    monkeypatch.setattr(relink_module, "open_image", open_child_faulty)
    crash_at = None
    set_parent(child, moved)
    count = opened[-1].count
    for crash_at in range(count):
        child.write_bytes(pristine)
        with pytest.raises(SimulatedCrash):
            set_parent(child, moved)
        assert read_all(child) == expected, f"crash at {crash_at}"
        with vhdx.open(child) as disk:
            assert disk.parent.path in (str(moved), str(tmp_path / "base.vhdx"))
