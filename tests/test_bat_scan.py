"""The BAT pass of the loader: uniform windows judged in bulk, everything else exactly as the plain window path.

The reference below is the plain path spelled out: every window of the whole BAT judged by ``bat_problems`` and
the refusals gathered by ``Refusals``, the counts taken from the whole split BAT. The loader (``VhdxFile.load``)
and ``Bat.summary`` must agree with it on any BAT, whatever shortcut they take for uniform windows.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhdx.errors import FormatError
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.ops.create import create
from vhdx.structures import bat as bat_module
from vhdx.structures import file as file_module
from vhdx.structures.bat import BAT_DTYPE, Bat, entry_states, split_entries
from vhdx.structures.bat_rules import Refusals, bat_problems, structure_spans, windows
from vhdx.structures.file import VhdxFile

MiB, GiB = 1 << 20, 1 << 30
BLOCK = 256 * MiB  # with 512-byte sectors: 16 blocks per chunk, a BAT of a few hundred entries
STRIDE = 17
# 24 whole chunks and a last one of 13 blocks, the last of which the disk ends inside.
SIZE = 24 * 4 * GiB + 12 * BLOCK + 64 * MiB
WINDOW = 2 * STRIDE  # two chunks per window: 13 windows, the last one partial
DATA_BLOCKS = 3  # blocks of file space past the structures (sparse)


def _layout(path: str) -> tuple[int, int, int]:
    """(BAT file offset, BAT entries, first data offset) of a file made by ``_disk``."""
    io = ImageIO.open(path)
    try:
        loaded = VhdxFile.load(io, bat=False)
        end = max(e.end for e in loaded.regions.entries)
        return loaded.regions.bat.file_offset, loaded.geometry.bat_entries, -(-end // MiB) * MiB
    finally:
        io.close()


@pytest.fixture(scope="module")
def disks(tmp_path_factory) -> dict[str, str]:
    """A dynamic and a differencing disk of SIZE with room for DATA_BLOCKS blocks after the structures."""
    folder = tmp_path_factory.mktemp("bat-scan")
    base = create(folder / "base.vhdx", SIZE, block_size=BLOCK, logical_sector_size=512)
    child = create(folder / "child.avhdx", parent=base, block_size=BLOCK)
    for path in (base, child):
        _bat, _n, data = _layout(path)
        os.truncate(path, data + DATA_BLOCKS * BLOCK)
    return {"dynamic": str(base), "differencing": str(child)}


def _values(data_offset: int, file_size: int) -> list[int]:
    """Payload and bitmap entries worth trying: every state, kept and reserved bits, offsets good and bad."""
    offsets = [0, MiB, data_offset, data_offset + BLOCK, file_size - MiB, 1 << 40]  # MiB: the header section
    values = list(range(8)) + [c.BatState.ZERO | (1 << 3), c.BatState.ZERO | data_offset]
    values += [state | off for state in (c.BatState.FULLY_PRESENT, c.BatState.PARTIALLY_PRESENT) for off in offsets]
    return values


@st.composite
def bats(draw, n_entries: int, data_offset: int, file_size: int) -> np.ndarray:
    """A BAT of windows each all zeros, uniform, uniform but one entry, or mixed; bitmaps sometimes set."""
    values = _values(data_offset, file_size)
    value = st.sampled_from(values)
    bitmap = st.sampled_from([0, 0, 0, c.SbState.PRESENT | data_offset, c.SbState.PRESENT | (1 << 40), 1, 4])
    entries = np.zeros(n_entries, dtype=BAT_DTYPE)
    for lo, hi in windows_of(n_entries):
        kind = draw(st.sampled_from(["zero", "uniform", "uniform", "one_off", "few_off", "bitmap", "mixed"]))
        window = entries[lo:hi]
        if kind == "zero":
            continue
        window[:] = draw(value)
        window[STRIDE - 1 :: STRIDE] = 0
        if kind == "one_off":
            window[draw(st.integers(0, hi - lo - 1))] = draw(value)
        elif kind == "few_off":  # a few entries anywhere, bitmap slots and the first slots included
            for at in draw(st.lists(st.integers(0, hi - lo - 1), min_size=2, max_size=5)):
                window[at] = draw(st.one_of(value, bitmap))
        elif kind == "bitmap":
            window[STRIDE - 1 :: STRIDE] = draw(bitmap)
        elif kind == "mixed":
            window[:] = draw(st.lists(value, min_size=hi - lo, max_size=hi - lo))
    return entries


def windows_of(n_entries: int):
    return [(lo, min(n_entries, lo + WINDOW)) for lo in range(0, n_entries, WINDOW)]


def _write_bat(path: str, entries: np.ndarray) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, entries.tobytes(), _layout(path)[0])
    finally:
        os.close(fd)


def _plain_path(path: str) -> tuple[tuple | None, tuple[int, ...], int]:
    """(refusal as (code, offset, message) or None, state counts, present bitmaps) by judging every window."""
    io = ImageIO.open(path)
    try:
        f = VhdxFile.load(io, bat=False)
        g, h = f.geometry, f.headers.current
        raw = np.fromfile(path, dtype=BAT_DTYPE, count=g.bat_entries, offset=f.regions.bat.file_offset)
        structures = structure_spans(h.log_offset, h.log_length, f.regions.entries)
        refusals = Refusals()
        for lo, hi in windows(g, len(raw), WINDOW):
            refusals.add(bat_problems(g, lo, raw[lo:hi], io.size, bat_offset=f.regions.bat.file_offset,
                                      structures=structures, disk_label=f.params.disk_type.label))
        payload, bitmap = split_entries(raw, g)
        counts = tuple(int(n) for n in np.bincount(entry_states(payload), minlength=8))
        bitmaps = int(np.count_nonzero(entry_states(bitmap) == c.SbState.PRESENT))
        problem = refusals.refusal()
        refusal = None if problem is None else (str(problem.code), problem.offset, problem.message)
        return refusal, counts, bitmaps
    finally:
        io.close()


def _loader_path(path: str) -> tuple[tuple | None, tuple[int, ...], int]:
    """The same three facts from the loader and from a fresh ``Bat.summary``."""
    io = ImageIO.open(path)
    try:
        f = VhdxFile.load(io, bat=False)
        summary = Bat.load(io, f.regions.bat, f.geometry).summary
    finally:
        io.close()
    io = ImageIO.open(path)
    refusal = None
    try:
        loaded = VhdxFile.load(io)
        assert loaded.bat is not None and loaded.bat.summary == summary
    except FormatError as exc:
        refusal = (exc.code, exc.offset, exc.message)
    finally:
        io.close()
    return refusal, summary.state_counts, summary.bitmaps_present


@pytest.mark.parametrize("threads", [2, 1])
@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
@given(data=st.data())
def test_loader_gives_the_plain_window_paths_counts_and_refusal(disks, kind, threads, data):
    path = disks[kind]
    _bat, n_entries, data_offset = _layout(path)
    entries = data.draw(bats(n_entries, data_offset, os.path.getsize(path)))
    _write_bat(path, entries)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bat_module, "WINDOW_ENTRIES", WINDOW)
        patch.setattr(bat_module, "SCAN_THREADS", threads)
        # Pieces smaller than a chunk and not a whole number of entries: every window is judged in several reads.
        patch.setattr(bat_module, "SCAN_PIECE", data.draw(st.sampled_from([44, 100, 1 << 20])))
        assert _loader_path(path) == _plain_path(path)


def _count_calls(patch: pytest.MonkeyPatch, module, name: str) -> list[int]:
    calls = [0]
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    patch.setattr(module, name, counted)
    return calls


def test_a_bat_of_zero_entries_is_judged_without_splitting_or_judging_a_window(disks, monkeypatch):
    path = disks["dynamic"]
    _bat, n_entries, _data = _layout(path)
    entries = np.full(n_entries, c.BatState.ZERO, dtype=BAT_DTYPE)  # as qemu-img writes a new BAT
    entries[STRIDE - 1 :: STRIDE] = 0
    _write_bat(path, entries)
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", WINDOW)
    splits = _count_calls(monkeypatch, bat_module, "split_window")
    judged = _count_calls(monkeypatch, file_module, "bat_problems")
    io = ImageIO.open(path)
    try:
        loaded = VhdxFile.load(io)
        assert loaded.bat is not None
        assert loaded.bat.state_counts() == {"ZERO": loaded.geometry.data_blocks}
    finally:
        io.close()
    assert splits == [0] and judged == [0]


def test_a_uniform_window_of_an_illegal_state_is_still_refused(disks, monkeypatch):
    path = disks["dynamic"]
    _bat, n_entries, _data = _layout(path)
    entries = np.zeros(n_entries, dtype=BAT_DTYPE)
    entries[3 * WINDOW : 4 * WINDOW] = 4  # state 4 is illegal everywhere
    entries[3 * WINDOW + STRIDE - 1 : 4 * WINDOW : STRIDE] = 0
    _write_bat(path, entries)
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", WINDOW)
    io = ImageIO.open(path)
    try:
        with pytest.raises(FormatError) as info:
            VhdxFile.load(io)
    finally:
        io.close()
    assert info.value.code == "BAT_STATE_ILLEGAL" and info.value.offset == _bat + 3 * WINDOW * c.BAT_ENTRY_SIZE
    assert f"(and {2 * (STRIDE - 1) - 1} more)" in info.value.message


# --- the scan's threads --------------------------------------------------------------------------------------
def _uniform_bat(path: str) -> np.ndarray:
    """Write a BAT of ZERO entries (as qemu-img does) and return it."""
    _bat, n_entries, _data = _layout(path)
    entries = np.full(n_entries, c.BatState.ZERO, dtype=BAT_DTYPE)
    entries[STRIDE - 1 :: STRIDE] = 0
    _write_bat(path, entries)
    return entries


def _scan_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "vhdx-bat-scan"]


def _judging_threads(monkeypatch) -> set[str]:
    """The names of the threads that judge windows from now on (filled in as ``Bat._judge_window`` runs)."""
    import threading

    seen, original = set(), Bat._judge_window

    def judged(self, w, templates, buf):
        seen.add(threading.current_thread().name)
        return original(self, w, templates, buf)

    monkeypatch.setattr(Bat, "_judge_window", judged)
    return seen


def test_the_scan_judges_windows_on_several_threads(disks, monkeypatch):
    path = disks["dynamic"]
    _uniform_bat(path)
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", WINDOW)
    seen = _judging_threads(monkeypatch)
    _loader_path(path)
    assert seen == {"vhdx-bat-scan"}


def test_a_read_error_on_a_scan_thread_is_raised_to_the_caller_at_its_window(disks, monkeypatch):
    from vhdx.errors import VhdxError

    path = disks["dynamic"]
    _uniform_bat(path)
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", WINDOW)
    original = Bat._judge_window

    def failing(self, w, templates, buf):
        if w == 5:
            raise VhdxError("read failed: Input/output error", path=path, offset=12345)
        return original(self, w, templates, buf)

    monkeypatch.setattr(Bat, "_judge_window", failing)
    io = ImageIO.open(path)
    try:
        f = VhdxFile.load(io, bat=False)
        bat = Bat.load(io, f.regions.bat, f.geometry)
        scan = bat.raw_windows()
        got = [next(scan).k0 // (WINDOW // STRIDE) for _ in range(5)]
        assert got == [0, 1, 2, 3, 4]  # the windows before the failing one arrive first
        with pytest.raises(VhdxError, match="Input/output error") as info:
            next(scan)
        assert info.value.offset == 12345
    finally:
        io.close()
    assert not _scan_threads()


def test_a_caller_that_stops_early_leaves_no_scan_thread_running(disks, monkeypatch):
    path = disks["dynamic"]
    _uniform_bat(path)
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", WINDOW)
    io = ImageIO.open(path)
    try:
        f = VhdxFile.load(io, bat=False)
        scan = Bat.load(io, f.regions.bat, f.geometry).raw_windows()
        first = next(scan)
        assert first.uniform == c.BatState.ZERO
        scan.close()
    finally:
        io.close()
    assert not _scan_threads()


def test_the_scan_judges_the_bat_as_a_replayed_log_left_it_in_memory(disks, monkeypatch):
    from vhdx.io import Overlay

    path = disks["dynamic"]
    bat_offset, _n, data_offset = _layout(path)
    _uniform_bat(path)
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", WINDOW)
    entry = np.array([c.BatState.FULLY_PRESENT | data_offset], dtype=BAT_DTYPE).tobytes()
    at = bat_offset + (4 * WINDOW + 3) * c.BAT_ENTRY_SIZE  # one payload entry of window 4, as the log wrote it
    sector = at - at % 4096
    io = ImageIO.open(path)
    try:
        image = bytearray(io.read_at(sector, 4096))
        image[at - sector : at - sector + 8] = entry
        io.overlay = Overlay({sector: bytes(image)}, [], io.real_size)
        f = VhdxFile.load(io, bat=False)
        summary = Bat.load(io, f.regions.bat, f.geometry).summary
    finally:
        io.close()
    assert summary.state_counts[c.BatState.FULLY_PRESENT] == 1


def test_a_stream_is_judged_on_the_callers_thread(disks, monkeypatch):
    import threading

    path = disks["dynamic"]
    _uniform_bat(path)
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", WINDOW)
    seen = _judging_threads(monkeypatch)
    import io as io_module

    class Stream(io_module.BufferedReader):
        def fileno(self):  # a stream without a descriptor (a pipe's reader, an archive member)
            raise io_module.UnsupportedOperation("fileno")

    with Stream(io_module.FileIO(path, "rb")) as fh:
        io = ImageIO.wrap(fh)  # no descriptor: reads seek, so only one thread may read
        assert not io.concurrent_reads
        f = VhdxFile.load(io, bat=False)
        counts = Bat.load(io, f.regions.bat, f.geometry).summary.state_counts
    assert seen == {threading.main_thread().name} and counts[c.BatState.ZERO] == f.geometry.data_blocks


# --- equal_bytes: memcmp without the GIL ----------------------------------------------------------------------
def test_equal_bytes_finds_a_difference_in_the_last_byte():
    from vhdx.io import equal_bytes

    a = bytearray(1 << 20)
    b = bytearray(1 << 20)
    assert equal_bytes(a, b)
    b[-1] = 1
    assert not equal_bytes(a, b)


def test_equal_bytes_of_different_lengths_is_false():
    from vhdx.io import equal_bytes

    assert not equal_bytes(bytes(8), bytes(16))
    assert equal_bytes(b"", b"")


def test_equal_bytes_compares_in_python_without_a_c_memcmp(monkeypatch):
    from vhdx import io as io_module

    monkeypatch.setitem(io_module._LIBC, "memcmp", None)
    assert io_module.equal_bytes(b"abc", bytearray(b"abc"))
    assert not io_module.equal_bytes(b"abc", b"abd")


def test_equal_bytes_compares_read_only_buffers_and_array_views():
    from vhdx.io import equal_bytes

    a = np.arange(1024, dtype=np.uint64)
    assert equal_bytes(a, a.tobytes())
    assert equal_bytes(memoryview(a.tobytes())[8:16], a[1:2])
    b = a.copy()
    b[1000] = 7
    assert not equal_bytes(a, b)
    assert not equal_bytes(memoryview(bytearray(a.tobytes()))[8:], b[1:])


def test_bat_scan_on_threads_and_on_one_thread_agree(disks, monkeypatch):
    path = disks["differencing"]
    _bat, n_entries, data_offset = _layout(path)
    rng = np.random.default_rng(3)
    entries = np.full(n_entries, c.BatState.ZERO, dtype=BAT_DTYPE)
    entries[STRIDE - 1 :: STRIDE] = 0
    entries[rng.integers(0, n_entries, 5)] = c.BatState.FULLY_PRESENT | data_offset
    _write_bat(path, entries)
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", WINDOW)
    on_threads = _loader_path(path)
    monkeypatch.setattr(bat_module, "SCAN_THREADS", 1)
    assert _loader_path(path) == on_threads == _plain_path(path)


# --- windows of one repeated entry but a few: judged by those entries alone -----------------------------------
def _zero_bat_with(path: str, written: dict[int, int]) -> np.ndarray:
    """A BAT of ZERO entries (as qemu-img writes it) with ``written`` {BAT index: raw entry} set."""
    entries = _uniform_bat(path)
    for index, raw in written.items():
        entries[index] = raw
    _write_bat(path, entries)
    return entries


def test_a_bat_of_zero_entries_with_a_few_blocks_written_is_judged_without_splitting_or_judging_a_window(
        disks, monkeypatch):
    path = disks["dynamic"]
    _bat, _n, data_offset = _layout(path)
    # Blocks 0 and 1 lead their window: the scan must not take a written block's entry for the repeated one.
    _zero_bat_with(path, {0: c.BatState.FULLY_PRESENT | data_offset,
                          1: c.BatState.FULLY_PRESENT | (data_offset + BLOCK),
                          5 * WINDOW + 3: c.BatState.FULLY_PRESENT | (data_offset + 2 * BLOCK)})
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", WINDOW)
    splits = _count_calls(monkeypatch, bat_module, "split_window")
    judged = _count_calls(monkeypatch, file_module, "bat_problems")
    refusal, counts, _bitmaps = _loader_path(path)
    assert refusal is None and counts[c.BatState.FULLY_PRESENT] == 3
    assert splits == [0] and judged == [0]
    assert _loader_path(path) == _plain_path(path)


@pytest.mark.parametrize("where", ["past the end of the file", "over the header section", "illegal state"])
def test_a_bad_entry_among_zero_entries_is_refused_as_the_plain_path_refuses_it(disks, monkeypatch, where):
    path = disks["dynamic"]
    _bat, _n, data_offset = _layout(path)
    raw = {"past the end of the file": c.BatState.FULLY_PRESENT | (data_offset + 3 * BLOCK),
           "over the header section": c.BatState.FULLY_PRESENT,
           "illegal state": 4}[where]
    _zero_bat_with(path, {4 * WINDOW + 2: raw})
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", WINDOW)
    refusal, _counts, _bitmaps = _loader_path(path)
    assert refusal is not None and refusal == _plain_path(path)[0]


def test_a_window_with_more_exceptions_than_the_scan_keeps_is_judged_whole(disks, monkeypatch):
    path = disks["dynamic"]
    _bat, _n, data_offset = _layout(path)
    monkeypatch.setattr(bat_module, "MAX_EXCEPTIONS", 2)
    _zero_bat_with(path, {WINDOW + i: c.BatState.FULLY_PRESENT | data_offset for i in (1, 2, 3)})
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", WINDOW)
    judged = _count_calls(monkeypatch, file_module, "bat_problems")
    assert _loader_path(path) == _plain_path(path)
    assert judged == [1]


def test_a_sector_bitmap_entry_among_zero_entries_is_judged_with_its_window(disks, monkeypatch):
    path = disks["differencing"]
    _bat, _n, data_offset = _layout(path)
    _zero_bat_with(path, {2 * WINDOW + 3: c.BatState.PARTIALLY_PRESENT | data_offset,
                          2 * WINDOW + STRIDE - 1: c.SbState.PRESENT | (data_offset + BLOCK)})
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", WINDOW)
    judged = _count_calls(monkeypatch, file_module, "bat_problems")
    assert _loader_path(path) == _plain_path(path)
    assert judged == [1]


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
@given(data=st.data())
def test_an_exception_the_loader_clears_breaks_no_rule_that_stops_the_reader(disks, kind, data):
    """``exception_stops_no_reader`` may say no to a good entry, never yes to one ``bat_problems`` refuses."""
    from vhdx.structures.bat_rules import exception_stops_no_reader

    path = disks[kind]
    bat_offset, n_entries, data_offset = _layout(path)
    io = ImageIO.open(path)
    try:
        f = VhdxFile.load(io, bat=False)
        g, h, size = f.geometry, f.headers.current, io.size
    finally:
        io.close()
    structures = structure_spans(h.log_offset, h.log_length, f.regions.entries)
    index = data.draw(st.integers(0, n_entries - 1))
    raw = data.draw(st.sampled_from(_values(data_offset, size)) | st.integers(0, 2**64 - 1))
    stride = g.chunk_ratio + 1
    first = index - index % stride
    window = np.zeros(min(stride, n_entries - first), dtype=BAT_DTYPE)
    window[index - first] = raw
    judged = bat_problems(g, first, window, size, bat_offset=bat_offset, structures=structures,
                          disk_label=kind)
    if exception_stops_no_reader(g, index, raw, size, structures):
        assert judged.refusal() is None
