"""How a merge pushes its copied data towards the disk: write-back of each copied range is started while the copy
goes on (no flush of the whole file in the middle of it), and the data is made durable once, before the metadata
that points at it."""

from __future__ import annotations

import threading
import time

import pytest

import vhdx
from tests.support.merge_chains import make_merge_workload, read_view
from vhdx import io as vio
from vhdx.io import ImageIO

MiB = 1 << 20


@pytest.fixture
def slow_copy_chain(tmp_path, monkeypatch):
    """A child with 40 MiB of data over a 32 MiB-block parent (a block written in place and a new one); each copy
    takes long enough for a helper thread on a timer to act during it."""
    child = make_merge_workload(tmp_path / "chain", 40 * MiB)
    expected = read_view(child)
    events: list[tuple[str, object]] = []
    lock = threading.Lock()
    copying = threading.Event()
    copy_from = ImageIO.copy_from

    def slow_copy_from(self, src, src_offset, offset, length, buf=None):
        copying.set()
        try:
            shared = copy_from(self, src, src_offset, offset, length, buf)
            time.sleep(0.12)  # a helper thread that flushes on a timer gets its turn inside the copy
            with lock:
                events.append(("copied", (offset, length)))
            return shared
        finally:
            copying.clear()

    def recorder(name, real):
        def call(fd, *args):
            with lock:
                events.append((name, "while copying" if copying.is_set() else "outside the copy"))
            return real(fd, *args)
        return call

    monkeypatch.setattr(ImageIO, "copy_from", slow_copy_from)
    monkeypatch.setattr(vio.os, "fsync", recorder("fsync", vio.os.fsync))
    monkeypatch.setattr(vio.os, "fdatasync", recorder("fdatasync", vio.os.fdatasync))
    started: list[tuple[int, int]] = []
    start_writeback = vio.start_writeback

    def record_writeback(fd, offset, length):
        with lock:
            started.append((offset, length))
        start_writeback(fd, offset, length)

    monkeypatch.setattr(vio, "start_writeback", record_writeback)
    return child, expected, events, started


def test_merge_does_not_flush_the_destination_while_copying(slow_copy_chain):
    child, expected, events, _ = slow_copy_chain
    result = vhdx.merge_chain(child)
    assert [e for e in events if e[0] == "copied"], "the merge copied nothing"
    assert [e for e in events if e[0] in ("fsync", "fdatasync") and e[1] == "while copying"] == []
    assert read_view(result.destination) == expected


@pytest.mark.skipif(vio._sync_file_range() is None, reason="the C library has no sync_file_range")
def test_merge_starts_the_write_back_of_every_copied_range(slow_copy_chain):
    child, expected, events, started = slow_copy_chain
    result = vhdx.merge_chain(child)
    copied = [span for name, span in events if name == "copied"]
    assert copied

    def covered(offset, length):
        return any(lo <= offset and offset + length <= lo + n for lo, n in started)

    assert [span for span in copied if not covered(*span)] == []
    assert read_view(result.destination) == expected


@pytest.mark.skipif(vio._sync_file_range() is None, reason="the C library has no sync_file_range")
def test_write_behind_starts_every_range_written_even_out_of_order(tmp_path, monkeypatch):
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(vio, "start_writeback", lambda fd, offset, length: started.append((offset, length)))
    with open(tmp_path / "f", "wb") as f, vio.WriteBehind(f.fileno()) as behind:
        behind.wrote(64 * MiB, MiB)
        behind.wrote(0, MiB)
        behind.wrote(MiB, MiB)
    covered = set()
    for lo, n in started:
        covered.update(range(lo // MiB, (lo + n) // MiB))
    assert covered == {0, 1, 64}
