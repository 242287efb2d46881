"""Hypothesis mutation fuzzing: damaged small images go through open + info + check + full read + convert.

Allowed outcomes: a correct result or a ``VhdxError``. Any other exception, a hang (each example runs under
an alarm) or an inconsistency fails:

- ``check`` never raises; when the reader refuses a file (other than for a missing parent), ``check`` has
  reported at least one error, and the finding code the refusal names (``VhdxError.code``) is among them;
- when the file opens, the full read returns the virtual size, and ``convert`` to raw gives the same bytes.

Mutations: byte flips near every structure, truncations, structure fields set to random or extreme values
(huge counts and lengths), optionally with the checksum restamped so the damage reaches the deeper checks.
Base images: a dynamic disk and a differencing child (read alone), made with ``vhdx.ops.create`` and writes.

Run the long profile with ``pytest tests/fuzz --hypothesis-profile=fuzz`` (100,000 inputs); set
``VHDX_FUZZ_COUNT_FILE`` to have the number of inputs run written there as it goes.
"""

from __future__ import annotations

import os
import signal
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdx
from vhdx.errors import ChainError, VhdxError
from vhdx.format import checksum
from vhdx.format import constants as c
from vhdx.ops.check import check_image
from vhdx.ops.create import create
from vhdx.ops.export import export_raw
from vhdx.ops.inspect import describe_image

MiB = 1 << 20
EXAMPLE_SECONDS = 20
FULL_READ_LIMIT = 16 * MiB  # bases are 3 MiB; bigger sizes come from damaged fields


@dataclass(frozen=True)
class Field:
    """A structure field a mutation may set: where, how wide, and which checksum covers it."""

    name: str
    offset: int
    size: int
    crc: tuple[int, int] | None = None  # (structure offset, structure length) to restamp


@dataclass(frozen=True)
class Base:
    name: str
    data: bytes
    fields: tuple[Field, ...]
    hot: tuple[int, ...]  # offsets of structures, where flips are most telling


def _fields(path: Path) -> tuple[tuple[Field, ...], tuple[int, ...]]:
    fields = []
    with vhdx.open(path, orphan=True) as image:
        for off in c.HEADER_OFFSETS:
            crc = (off, c.HEADER_SIZE)
            for name, rel, size in (("seq", 8, 8), ("log_guid", 48, 16), ("log_version", 64, 2), ("version", 66, 2),
                                    ("log_length", 68, 4), ("log_offset", 72, 8)):
                fields.append(Field(f"header@{off:#x}.{name}", off + rel, size, crc))
        for off in c.REGION_TABLE_OFFSETS:
            crc = (off, c.REGION_TABLE_SIZE)
            fields.append(Field(f"regions@{off:#x}.count", off + 8, 4, crc))
            for i in range(2):
                e = off + 16 + 32 * i
                for name, rel, size in (("offset", 16, 8), ("length", 24, 4), ("flags", 28, 4)):
                    fields.append(Field(f"region{i}@{off:#x}.{name}", e + rel, size, crc))
        meta = image.regions.metadata.file_offset
        fields.append(Field("metadata.count", meta + 10, 2))
        for entry in image.metadata.entries:
            t = entry.table_offset
            for name, rel, size in (("offset", 16, 4), ("length", 20, 4), ("flags", 24, 4)):
                fields.append(Field(f"{entry.name}.{name}", t + rel, size))
            if entry.length:
                item = meta + entry.offset
                fields.append(Field(f"{entry.name}.value", item, min(entry.length, 8)))
                if entry.item_id == c.PARENT_LOCATOR_GUID:
                    fields.append(Field("locator.count", item + 18, 2))
                    for rel in range(20, 20 + 12 * 3, 2):
                        fields.append(Field(f"locator.entry+{rel}", item + rel, 2))
        bat = image.bat.file_offset
        for i in range(min(len(image.bat.entries), 8)):
            fields.append(Field(f"bat[{i}]", bat + 8 * i, 8))
        if image.has_parent:
            sb = int(image.geometry.bitmap_index(0))
            fields.append(Field("bat[sb0]", bat + 8 * sb, 8))
        log = image.headers.current.log_offset
        hot = (0, *c.HEADER_OFFSETS, *c.REGION_TABLE_OFFSETS, log, meta, bat, bat + 4096)
    return tuple(fields), hot


def _dirty_log(path: Path) -> None:
    """Leave a replayable log behind: a committed write whose final header update never happened."""
    from dataclasses import replace

    from vhdx.io import ImageIO
    from vhdx.structures.header import load_headers
    from vhdx.structures.log import DataWrite, build_entry

    io = ImageIO.open(path, writable=True)
    try:
        headers = load_headers(io)
        h = headers.current
        sector = bytearray(io.read_at(4 * MiB, 4096))
        sector[:4] = b"LOGD"
        import uuid

        guid = uuid.UUID(int=0x1234)
        size = -(-io.real_size // MiB) * MiB
        io.write_at(h.log_offset, build_entry([DataWrite(4 * MiB, bytes(sector))], sequence_number=3, log_guid=guid,
                                              tail=0, flushed_file_offset=size, last_file_offset=size))
        io.write_at(headers.current_copy.offset, replace(h, log_guid=guid).to_bytes())
    finally:
        io.close()


def _build_bases() -> list[Base]:
    with tempfile.TemporaryDirectory(prefix="vhdx-fuzz-base-") as work:
        return _build_bases_in(Path(work))


def _build_bases_in(work: Path) -> list[Base]:
    rng = np.random.default_rng(7)
    base = work / "base.vhdx"
    create(base, 3 * MiB, block_size=MiB, logical_sector_size=512, log_size=MiB)
    with vhdx.open(base, writable=True) as image:
        image.write(0, rng.integers(0, 256, MiB, dtype=np.uint8).tobytes())
        image.write(2 * MiB + 512, rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    child = work / "child.avhdx"
    create(child, parent=base, block_size=MiB)
    with vhdx.open(child, writable=True) as image:
        image.write(MiB + 1024, rng.integers(0, 256, 3072, dtype=np.uint8).tobytes())
    dirty = work / "dirty.vhdx"
    dirty.write_bytes(base.read_bytes())
    _dirty_log(dirty)
    bases = []
    for name, path in (("dynamic", base), ("differencing", child), ("dirty-log", dirty)):
        fields, hot = _fields(path)
        bases.append(Base(name, path.read_bytes(), fields, hot))
    return bases


BASES = _build_bases()
EXTREMES = (0, 1, 2, 3, 4, 5, 6, 7, 0x7F, 0x80, 0xFF, 0x1000, 0x10000, 0x100000, 0x200000, 0x300000, 0x7FFFFFFF,
            0xFFFFFFFF, 2**40, 2**44, 2**63, 2**64 - 1)


class Case:
    """One mutated image: the base it came from, the steps applied, and the bytes."""

    def __init__(self, base: str, data: bytes, steps: tuple[str, ...]) -> None:
        self.base, self.data, self.steps = base, data, steps

    def __repr__(self) -> str:  # what hypothesis prints for a failing example: the recipe, not megabytes
        return f"Case({self.base!r}, steps={list(self.steps)!r}, size={len(self.data)})"


@st.composite
def mutations(draw):
    base = draw(st.sampled_from(BASES))
    data = bytearray(base.data)
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "flip", "field", "field", "truncate"]))
        if kind == "flip":
            at = draw(st.one_of(st.sampled_from(base.hot).flatmap(lambda h: st.integers(h, h + 4095)),
                                st.integers(0, max(0, len(data) - 1))))
            if at < len(data):
                data[at] ^= draw(st.integers(1, 255))
                steps.append(f"flip {at:#x}")
        elif kind == "field":
            f = draw(st.sampled_from(base.fields))
            limit = 2 ** (8 * f.size) - 1
            value = draw(st.one_of(st.sampled_from([v & limit for v in EXTREMES]), st.integers(0, limit)))
            if f.offset + f.size <= len(data):
                data[f.offset : f.offset + f.size] = value.to_bytes(f.size, "little")
                if f.crc and draw(st.booleans()) and f.crc[0] + f.crc[1] <= len(data):
                    start, length = f.crc
                    view = memoryview(data)[start : start + length]
                    checksum.stamp(view, 4)
                    view.release()
                steps.append(f"{f.name}={value:#x}")
        else:
            cut = draw(st.one_of(st.integers(0, len(data)), st.sampled_from(base.hot)))
            del data[cut:]
            steps.append(f"truncate {cut:#x}")
    return Case(base.name, bytes(data), tuple(steps))


class Timeout(Exception):
    pass


@contextmanager
def time_limit(seconds: int):
    def expired(signum, frame):
        raise Timeout(f"example ran longer than {seconds}s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


_COUNT = {"n": 0}


def _count() -> None:
    _COUNT["n"] += 1
    target = os.environ.get("VHDX_FUZZ_COUNT_FILE")
    if target and _COUNT["n"] % 500 == 0:
        Path(target).write_text(f"{_COUNT['n']}\n")


def exercise(path: Path, out: Path) -> None:
    """open + info + check + full read + convert; raise AssertionError on anything not allowed."""
    report = check_image(path)
    assert report.exit_code in (0, 1, 2, 3)
    try:
        image = vhdx.open(path, orphan=True)
    except ChainError:
        return
    except VhdxError as exc:
        assert report.exit_code in (1, 2), f"open refused ({exc}) but check found no error: {report.all_findings}"
        # One rule, one code: a refusal that names a rule names one check reports as an error.
        errors = {f.code for f in report.all_findings if f.severity.value == "error"}
        assert exc.code is None or exc.code in errors, f"open refused with {exc.code} ({exc}), check: {errors}"
        return
    try:
        with image:
            describe_image(image)
            if image.virtual_size > FULL_READ_LIMIT:
                # A damaged size field may claim up to 64 TiB: read what the BAT maps and both ends only, so
                # memory stays bounded by the file, not by the claim.
                image.extents()
                tail = max(0, image.virtual_size - MiB)
                assert len(image.read(0, MiB)) == min(MiB, image.virtual_size)
                assert len(image.read(tail, MiB)) == image.virtual_size - tail
                return
            data = image.read(0, image.virtual_size)
            assert len(data) == image.virtual_size
            export_raw(image, out, overwrite=True)
            with open(out, "rb") as f:
                assert f.read() == data
    except VhdxError:
        pass


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="vhdx-fuzz-") as d:
        yield Path(d)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture], deadline=None)
@given(case=mutations())
def test_fuzz_mutated_images_give_a_result_or_a_vhdx_error(workdir, case):
    path = workdir / "case.vhdx"
    path.write_bytes(case.data)
    _count()
    with time_limit(EXAMPLE_SECONDS):
        exercise(path, workdir / "out.raw")


@pytest.mark.parametrize("base", BASES, ids=lambda b: b.name)
def test_fuzz_unmutated_bases_read_and_check_clean(workdir, base):
    path = workdir / f"{base.name}.vhdx"
    path.write_bytes(base.data)
    report = check_image(path)
    # The child's parent is not kept (it is read alone); the dirty-log base must report its log.
    expected = {"dynamic": set(), "differencing": {"PARENT_NOT_FOUND"}, "dirty-log": {"LOG_DIRTY"}}[base.name]
    assert {f.code for f in report.errors} == expected
    exercise(path, workdir / "out.raw")


def test_fuzz_huge_claimed_log_length_is_refused_without_allocating(workdir):
    base = BASES[0]
    data = bytearray(base.data)
    off = c.HEADER_OFFSETS[1]
    struct.pack_into("<I", data, off + 68, 0xFFF00000)
    data[off + 48 : off + 64] = b"\x11" * 16  # a log GUID, so the log is read
    checksum.stamp(memoryview(data)[off : off + c.HEADER_SIZE], 4)
    path = workdir / "huge.vhdx"
    path.write_bytes(bytes(data))
    with time_limit(EXAMPLE_SECONDS):
        exercise(path, workdir / "out.raw")
