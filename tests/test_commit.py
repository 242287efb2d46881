"""The one log commit (vhdx.structures.commit): a crash anywhere in it leaves old or new bytes, and its fsyncs.

The crash sweeps stop the commit at every write, flush and truncate, and (PowerCutIO) lose what was not yet
flushed, all of it or some of it. After each crash the file must open, replay its log, pass ``check`` and hold,
byte for byte outside the headers and the log, the file as it was before the commit or after some of its entries.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

import vhdx
from tests.support.faulty_io import PowerCutIO, SimulatedCrash
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.ops.check import check_image
from vhdx.ops.create import create
from vhdx.structures import commit as commit_module
from vhdx.structures.commit import commit_through_log
from vhdx.structures.header import load_headers
from vhdx.structures.log import SECTOR, DataWrite

MiB = 1 << 20
SIZE = 8 * MiB
SPARE = 4 * MiB  # unreferenced space at the end of the file the direct commits write into

LOSSES = {
    "nothing-lost": lambda index, count: False,
    "all-unflushed-lost": lambda index, count: True,
    "every-other-unflushed-lost": lambda index, count: index % 2 == 0,
    "only-the-newest-kept": lambda index, count: index < count - 1,
}


class CountingIO(ImageIO):
    """An ImageIO that counts its flush (fsync) calls."""

    flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


def counting(path) -> CountingIO:
    return CountingIO.open(path, writable=True)


def plain_disk(folder, name="d.vhdx"):
    path = folder / name
    create(path, SIZE, block_size=MiB)
    return path


def disk_with_spare_space(folder):
    path = plain_disk(folder)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + SPARE)
    return path


def spare_writes(path, count=5) -> list[DataWrite]:
    start = path.stat().st_size - SPARE
    return [DataWrite(start + i * 3 * SECTOR, bytes([0x50 + i]) * SECTOR) for i in range(count)]


def current_header(path):
    io = ImageIO.open(path)
    try:
        return load_headers(io).current
    finally:
        io.close()


def outside_headers_and_log(path) -> bytes:
    """The file's bytes except the two header copies and the log (what a commit's model predicts)."""
    data = path.read_bytes()
    h = current_header(path)
    return data[: c.HEADER_OFFSETS[0]] + data[c.HEADER_OFFSETS[1] + c.HEADER_SIZE : h.log_offset] + \
        data[h.log_offset + h.log_length :]


def apply_model(path, writes) -> bytes:
    """The file after ``writes``, done without any log: what a finished commit must leave."""
    data = bytearray(path.read_bytes())
    for w in writes:
        data[w.file_offset : w.file_offset + len(w.data)] = w.data
    return bytes(data)


def assert_opens_clean(path):
    with vhdx.open(path, writable=True):
        pass  # replays a dirty log to disk
    assert current_header(path).log_guid == c.ZERO_GUID
    assert not check_image(path).errors


# --- crash sweeps -------------------------------------------------------------------------------------------
def commit_direct(path, writes, crash_at, lose):
    io = PowerCutIO.open_faulty(path, crash_at, lose)
    try:
        commit_through_log(io, load_headers(io), writes, flush_payload=False, start_session=True, empty_after=True)
    finally:
        io.close()
    return io.count


@pytest.mark.parametrize("per_entry", [None, 2])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_crash_anywhere_in_commit_through_log_leaves_a_prefix_of_its_entries(tmp_path, monkeypatch, per_entry, loss):
    if per_entry is not None:
        monkeypatch.setattr(commit_module, "max_entry_sectors", lambda log_length: per_entry)
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    path = disk_with_spare_space(pristine)
    writes = spare_writes(path)
    step = per_entry or len(writes)
    states = []  # the model: the file after the first k entries, k = 0..all
    for k in range(0, len(writes) + step, step):
        work = tmp_path / f"model{k}"
        shutil.copytree(pristine, work)
        states.append(outside_headers_and_log_of(work / path.name, apply_model(work / path.name, writes[:k])))
    ref = tmp_path / "ref"
    shutil.copytree(pristine, ref)
    count = commit_direct(ref / path.name, writes, None, LOSSES[loss])
    assert outside_headers_and_log(ref / path.name) == states[-1]
    seen = set()
    for crash_at in range(count):
        work = tmp_path / f"run{crash_at}"
        shutil.copytree(pristine, work)
        with pytest.raises(SimulatedCrash):
            commit_direct(work / path.name, writes, crash_at, LOSSES[loss])
        assert_opens_clean(work / path.name)
        got = outside_headers_and_log(work / path.name)
        assert got in states, f"crash at operation {crash_at}: not the file after any prefix of the entries"
        seen.add(states.index(got))
        shutil.rmtree(work)
    assert seen == set(range(len(states)))  # every state is reachable: the sweep covers each step


def outside_headers_and_log_of(path, data: bytes) -> bytes:
    path.write_bytes(data)
    return outside_headers_and_log(path)


def read_all(path) -> bytes:
    with vhdx.open(path) as disk:
        return disk.read(0, disk.virtual_size)


def write_new_block(disk):
    disk.write(6 * MiB + 100, b"\x33" * 5000)


def two_new_blocks(disk):
    disk.write(MiB + 100, b"\x21" * 5000)
    disk.flush()
    disk.write(5 * MiB, b"\x22" * 8192)


def zero_and_discard(disk):
    disk.write(0, b"\x11" * (3 * MiB))
    disk.flush()
    disk.write_zeros(MiB, 2 * MiB)
    disk.discard(0, MiB)


def write_through_writer(path, action, crash_at, lose):
    io = PowerCutIO.open_faulty(path, crash_at, lose)
    disk = vhdx.open(io, writable=True)
    try:
        action(disk)
    finally:
        disk.close()
    return io.count


@pytest.mark.parametrize("action", [write_new_block, two_new_blocks, zero_and_discard],
                         ids=["new-block", "two-commits", "zero-and-discard"])
@pytest.mark.parametrize("loss", ["all-unflushed-lost", "every-other-unflushed-lost", "only-the-newest-kept"])
def test_power_cut_anywhere_in_a_write_session_leaves_a_state_a_commit_made(tmp_path, action, loss):
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    path = plain_disk(pristine)
    old = read_all(path)
    ref = tmp_path / "ref"
    shutil.copytree(pristine, ref)
    count = write_through_writer(ref / path.name, action, None, LOSSES[loss])
    new = read_all(ref / path.name)
    legal = {old, new}
    if action is zero_and_discard:  # two commits: the state after the first is legal too
        legal.add(b"\x11" * (3 * MiB) + bytes(SIZE - 3 * MiB))
    if action is two_new_blocks:
        legal.add(bytes(MiB + 100) + b"\x21" * 5000 + bytes(SIZE - MiB - 5100))
    for crash_at in range(count):
        work = tmp_path / f"run{crash_at}"
        shutil.copytree(pristine, work)
        with pytest.raises(SimulatedCrash):
            write_through_writer(work / path.name, action, crash_at, LOSSES[loss])
        seen = read_all(work / path.name)  # read-only: the log replayed in memory
        assert seen in legal, f"crash at operation {crash_at} gave a state no commit made"
        assert_opens_clean(work / path.name)
        assert read_all(work / path.name) == seen, f"on-disk replay differs from in-memory replay ({crash_at})"
        shutil.rmtree(work)


# --- fsyncs per commit --------------------------------------------------------------------------------------
# The protocol needs, in order: the session's header update (new FileWriteGuid/DataWriteGuid) before any byte
# changes; payload durable before the entry that maps it is live; the entry durable before the header names it;
# the header naming it durable before the sectors are overwritten; the sectors durable before the log is emptied;
# then the second header copy brought up to date (spec SHOULD). Each is one fsync. An entry is live only once
# the header names its log, so the first commit of a session makes payload and entry durable with one fsync.
def test_one_small_write_into_a_new_block_and_close_cost_six_fsyncs(tmp_path):
    path = plain_disk(tmp_path)
    io = counting(path)
    with vhdx.open(io, writable=True) as disk:
        disk.write(MiB + 512, b"x" * 4096)
    # session header, payload with log entry, header names the log, sectors applied, log emptied, second copy
    assert io.flushes == 6


def test_both_header_copies_hold_the_session_content_after_close(tmp_path):
    path = plain_disk(tmp_path)
    with vhdx.open(path, writable=True) as disk:
        disk.write(MiB + 512, b"x" * 4096)
    io = ImageIO.open(path)
    try:
        headers = load_headers(io)
    finally:
        io.close()
    first, second = (copy.header for copy in headers.copies)
    assert all(copy.valid for copy in headers.copies)
    assert abs(first.sequence_number - second.sequence_number) == 1
    assert replace(first, sequence_number=0, checksum=0) == replace(second, sequence_number=0, checksum=0)


def test_a_write_into_an_allocated_block_and_close_cost_three_fsyncs(tmp_path):
    path = plain_disk(tmp_path)
    with vhdx.open(path, writable=True) as disk:
        disk.write(MiB, b"a" * MiB)
    io = counting(path)
    with vhdx.open(io, writable=True) as disk:
        disk.write(MiB + 512, b"x" * 4096)  # no metadata changes: no log entry
    # session header, payload, second header copy
    assert io.flushes == 3


def test_each_later_commit_of_a_session_costs_three_fsyncs(tmp_path):
    path = plain_disk(tmp_path)
    io = counting(path)
    with vhdx.open(io, writable=True) as disk:
        disk.write(0, b"x" * 4096)
        disk.flush()
        before = io.flushes
        disk.write(2 * MiB, b"y" * 4096)
        disk.flush()
        # payload, log entry, sectors applied (the header already names the session's log)
        assert io.flushes - before == 3


def test_a_one_commit_session_costs_six_fsyncs(tmp_path):
    path = disk_with_spare_space(tmp_path)
    io = counting(path)
    try:
        commit_through_log(io, load_headers(io), spare_writes(path, 1), flush_payload=False, start_session=True,
                           empty_after=True)
    finally:
        io.close()
    # session header, log entry, header names the log, sectors applied, log emptied, second header copy
    assert io.flushes == 6


def test_moving_blocks_costs_one_commit_without_a_flush_of_its_own(tmp_path):
    path = plain_disk(tmp_path)
    with vhdx.open(path, writable=True) as disk:
        disk.write(0, b"m" * MiB)
    io = counting(path)
    with vhdx.open(io, writable=True) as disk:
        disk.writer.begin(changes_data=False)
        before = io.flushes
        disk.writer.move_blocks([0], [disk.writer.allocate(MiB)])
        # copies with the log entry, header names the log, sectors applied
        assert io.flushes - before == 3
    assert read_all(path)[:MiB] == b"m" * MiB
