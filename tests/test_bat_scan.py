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
        kind = draw(st.sampled_from(["zero", "uniform", "uniform", "one_off", "bitmap", "mixed"]))
        window = entries[lo:hi]
        if kind == "zero":
            continue
        window[:] = draw(value)
        window[STRIDE - 1 :: STRIDE] = 0
        if kind == "one_off":
            window[draw(st.integers(0, hi - lo - 1))] = draw(value)
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


@pytest.mark.parametrize("reading", ["in place", "pread"])
@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
@given(data=st.data())
def test_loader_gives_the_plain_window_paths_counts_and_refusal(disks, kind, reading, data):
    path = disks[kind]
    _bat, n_entries, data_offset = _layout(path)
    entries = data.draw(bats(n_entries, data_offset, os.path.getsize(path)))
    _write_bat(path, entries)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bat_module, "WINDOW_ENTRIES", WINDOW)
        if reading == "pread":  # as for a BAT not in the page cache
            patch.setattr(ImageIO, "map_cached", lambda self, offset, length: None)
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


# --- reading the BAT in place from the page cache (ImageIO.map_cached) and every case that falls back to pread ---
@pytest.fixture
def warm_file(tmp_path) -> str:
    path = str(tmp_path / "warm.bin")
    with open(path, "wb") as fh:
        fh.write(np.arange(3 * MiB // 8, dtype=BAT_DTYPE).tobytes())
    return path


def _mapped(io: ImageIO, offset: int = 4096, length: int = 2 * MiB) -> np.ndarray | None:
    cached = io.map_cached(offset, length)
    return None if cached is None else cached.array(BAT_DTYPE)


def test_map_cached_maps_a_warm_range_of_a_read_only_file(warm_file):
    io = ImageIO.open(warm_file)
    try:
        entries = _mapped(io)
        assert entries is not None and not entries.flags.writeable
        assert (entries == np.arange(512, 512 + 2 * MiB // 8)).all()
    finally:
        io.close()


def test_map_cached_refuses_a_writable_open(warm_file):
    io = ImageIO.open(warm_file, writable=True)
    try:
        assert _mapped(io) is None
    finally:
        io.close()


def test_map_cached_refuses_a_descriptor_it_does_not_own(warm_file):
    with open(warm_file, "rb") as fh:
        assert _mapped(ImageIO.wrap(fh)) is None


def test_map_cached_refuses_a_range_past_the_end_of_the_file(warm_file):
    io = ImageIO.open(warm_file)
    try:
        assert _mapped(io, 2 * MiB, 2 * MiB) is None
    finally:
        io.close()


def test_map_cached_refuses_a_file_truncated_after_the_first_size_check(warm_file, monkeypatch):
    answers = iter([True, False])  # covered when asked first, truncated by the time it is mapped
    monkeypatch.setattr("vhdx.io._covers", lambda fd, end: next(answers))
    io = ImageIO.open(warm_file)
    try:
        assert _mapped(io) is None
    finally:
        io.close()


def test_map_cached_refuses_a_range_with_a_page_not_in_the_page_cache(warm_file, monkeypatch):
    def one_page_missing(address, length, vec):
        import ctypes

        ctypes.memset(vec, 1, int(length.value) // 4096)
        vec[3] = 0
        return 0

    monkeypatch.setattr("vhdx.io._mincore", lambda: one_page_missing)
    io = ImageIO.open(warm_file)
    try:
        assert _mapped(io) is None
    finally:
        io.close()


def test_map_cached_refuses_when_mincore_cannot_answer(warm_file, monkeypatch):
    monkeypatch.setattr("vhdx.io._mincore", lambda: lambda address, length, vec: -1)
    io = ImageIO.open(warm_file)
    try:
        assert _mapped(io) is None
    finally:
        io.close()


def test_map_cached_refuses_when_the_c_library_has_no_mincore(warm_file, monkeypatch):
    def no_mincore():
        raise AttributeError("mincore")

    monkeypatch.setattr("vhdx.io._mincore", no_mincore)
    io = ImageIO.open(warm_file)
    try:
        assert _mapped(io) is None
    finally:
        io.close()


def test_map_cached_refuses_a_file_another_process_writes(warm_file):
    import fcntl

    writer = os.open(warm_file, os.O_RDWR)  # another open file description holding the writer lock
    io = ImageIO.open(warm_file)
    try:
        fcntl.flock(writer, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert _mapped(io) is None
    finally:
        io.close()
        os.close(writer)


def test_map_cached_refuses_a_range_an_overlay_replays(warm_file):
    from vhdx.io import Overlay

    io = ImageIO.open(warm_file)
    try:
        io.overlay = Overlay({8192: bytes(4096)}, [], 3 * MiB)
        assert _mapped(io) is None
        assert _mapped(io, 2 * MiB, 4096) is not None  # a range the overlay does not touch
    finally:
        io.close()


def test_bat_scan_in_place_and_through_pread_agree(disks, monkeypatch):
    path = disks["differencing"]
    _bat, n_entries, data_offset = _layout(path)
    rng = np.random.default_rng(3)
    entries = np.full(n_entries, c.BatState.ZERO, dtype=BAT_DTYPE)
    entries[STRIDE - 1 :: STRIDE] = 0
    entries[rng.integers(0, n_entries, 5)] = c.BatState.FULLY_PRESENT | data_offset
    _write_bat(path, entries)
    monkeypatch.setattr(bat_module, "WINDOW_ENTRIES", WINDOW)
    made = []
    original = ImageIO.map_cached
    monkeypatch.setattr(ImageIO, "map_cached", lambda self, o, n: made.append(original(self, o, n)) or made[-1])
    in_place = _loader_path(path)
    assert made and all(m is not None for m in made)  # the freshly written BAT is in the page cache
    del made[:]
    monkeypatch.setattr(ImageIO, "map_cached", lambda self, offset, length: None)
    assert _loader_path(path) == in_place == _plain_path(path)
