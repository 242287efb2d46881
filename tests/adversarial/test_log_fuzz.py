"""Fuzzing the log (issue 12 acceptance): mutated entries through open, check and repair, each on a copy.

Entries are built with valid checksums (so the damage reaches past §2.3.2) from drawn targets, zero lengths,
descriptor counts, sequence numbers, tails, positions (wrapping around the ring) and file offsets; some get a
header field changed and the checksum stamped again. Allowed: a result or a ``VhdxError``. Required: no other
exception, no hang (an alarm per example), memory bounded (tracemalloc peak), ``check`` reports an error
whenever open refuses the file, and repair never leaves a file that no longer opens when it opened before.
"""

from __future__ import annotations

import os
import signal
import tempfile
import tracemalloc
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from construct import ConstructError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdx
from tests.support.hostile_logs import GUID, MiB, layout_of, plant_raw, small_disk
from vhdx.errors import ChainError, VhdxError
from vhdx.format import checksum
from vhdx.format import constants as c
from vhdx.ops.check import check_image
from vhdx.ops.repair import repair_image
from vhdx.structures.log import SECTOR, DataWrite, ZeroWrite, build_entry

EXAMPLE_SECONDS = 20
MEMORY_LIMIT = 64 * MiB


def _base() -> tuple[bytes, dict[str, int]]:
    with tempfile.TemporaryDirectory(prefix="vhdx-logfuzz-") as work:
        path = small_disk(Path(work) / "base.vhdx")
        return path.read_bytes(), layout_of(path)


BASE, LAYOUT = _base()
_L = LAYOUT
TARGETS = sorted({0, 0x10000, 0x30000, 0x40000, _L["log"], _L["log"] + _L["log_length"] - SECTOR, _L["metadata"],
                  _L["bat"], _L["bat"] + SECTOR, 4 * MiB, 4 * MiB + 8 * SECTOR, _L["size"] - SECTOR, _L["size"],
                  _L["size"] + MiB, 16 * MiB, 64 * MiB, 1 << 40, (1 << 64) - SECTOR, 123})
LENGTHS = (0, SECTOR, 3 * SECTOR, MiB, 2 << 30, 1 << 40, (1 << 64) - SECTOR, 100)
SEQUENCES = (1, 2, 7, 1 << 32, (1 << 63), (1 << 64) - 16)
FILE_OFFSETS = (0, _L["size"], -(-_L["size"] // MiB) * MiB, 1 << 40, 3 * MiB + 5)
HEADER_FIELDS = (("entry_length", 8, 4), ("tail", 12, 4), ("sequence_number", 16, 8), ("descriptor_count", 24, 4),
                 ("flushed", 48, 8), ("last", 56, 8))


@st.composite
def writes(draw):
    if draw(st.booleans()):
        return DataWrite(draw(st.sampled_from(TARGETS)) & ~0xFFF, bytes([draw(st.integers(0, 255))]) * SECTOR)
    return ZeroWrite(draw(st.sampled_from(TARGETS)), draw(st.sampled_from(LENGTHS)))


@st.composite
def hostile_logs(draw):
    count = draw(st.integers(1, 5))
    first = draw(st.sampled_from(SEQUENCES))
    position = draw(st.sampled_from([0, SECTOR, _L["log_length"] - SECTOR, _L["log_length"] // 2]))
    entries, steps = [], []
    tail_choice = draw(st.sampled_from(["first", "self", "elsewhere", "outside"]))
    for i in range(count):
        ws = draw(st.lists(writes(), max_size=4))
        seq = first + i + draw(st.sampled_from([0, 0, 0, 1, -1]))
        seq = min(max(seq, 0), (1 << 64) - 1)
        tail = {"first": entries[0][0] if entries else position, "self": position,
                "elsewhere": draw(st.integers(0, _L["log_length"] // SECTOR - 1)) * SECTOR,
                "outside": _L["log_length"] + SECTOR}[tail_choice]
        tail %= 1 << 32
        try:
            raw = bytearray(build_entry(ws, sequence_number=seq, log_guid=GUID, tail=tail,
                                        flushed_file_offset=draw(st.sampled_from(FILE_OFFSETS)),
                                        last_file_offset=draw(st.sampled_from(FILE_OFFSETS))))
        except (ValueError, OverflowError, ConstructError):  # a drawn value that does not fit its field
            continue
        if draw(st.integers(0, 3)) == 0:
            name, rel, size = draw(st.sampled_from(HEADER_FIELDS))
            value = draw(st.integers(0, (1 << (8 * size)) - 1))
            raw[rel : rel + size] = value.to_bytes(size, "little")
            if draw(st.booleans()):
                checksum.stamp(raw, c.LOG_ENTRY_CHECKSUM_OFFSET)
            steps.append(f"entry{i}.{name}={value:#x}")
        entries.append((position, bytes(raw)))
        steps.append(f"entry{i}@{position:#x} seq={seq} tail={tail:#x} writes={ws!r:.200}")
        position = (position + len(raw) + draw(st.sampled_from([0, 0, 0, SECTOR]))) % _L["log_length"]
    return entries, steps


class Timeout(Exception):
    pass


@contextmanager
def limits(seconds: int):
    def expired(signum, frame):
        raise Timeout(f"example ran longer than {seconds}s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
        assert peak < MEMORY_LIMIT, f"peak Python memory {peak} bytes"
    finally:
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _opens(path: Path) -> bool:
    try:
        with vhdx.open(path, orphan=True) as image:
            image.read(0, min(image.virtual_size, MiB))
        return True
    except ChainError:
        return True
    except VhdxError:
        return False


def exercise(path: Path) -> None:
    report = check_image(path)
    assert report.exit_code in (0, 1, 2, 3)
    opened = _opens(path)
    if not opened:
        assert report.exit_code in (1, 2), f"open refused but check found no error: {report.all_findings}"
    with suppress(VhdxError):
        repair_image(path)
    if opened:
        assert _opens(path), "repair left a file that no longer opens"


_COUNT = {"n": 0}


def _count() -> None:
    # VHDX_FUZZ_COUNT_FILE (as in tests/fuzz): how many inputs a long run got through, written as it goes.
    _COUNT["n"] += 1
    target = os.environ.get("VHDX_FUZZ_COUNT_FILE")
    if target and _COUNT["n"] % 100 == 0:
        Path(target).write_text(f"{_COUNT['n']}\n")


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="vhdx-logfuzz-") as d:
        yield Path(d)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture], deadline=None)
@given(case=hostile_logs())
def test_fuzz_mutated_log_entries_give_a_result_or_a_vhdx_error(workdir, case):
    entries, _steps = case
    path = workdir / "case.vhdx"
    path.write_bytes(BASE)
    if entries:
        plant_raw(path, entries)
    _count()
    with limits(EXAMPLE_SECONDS):
        exercise(path)


def test_fuzz_base_with_a_clean_replayable_entry_repairs_and_opens(workdir):
    path = workdir / "clean.vhdx"
    path.write_bytes(BASE)
    size = -(-_L["size"] // MiB) * MiB
    raw = build_entry([DataWrite(4 * MiB, b"\x5a" * SECTOR)], sequence_number=1, log_guid=GUID, tail=0,
                      flushed_file_offset=size, last_file_offset=size)
    plant_raw(path, [(0, raw)])
    with limits(EXAMPLE_SECONDS):
        exercise(path)
    with vhdx.open(path) as image:
        assert image.read(0, SECTOR) == b"\x5a" * SECTOR
