"""Hypothesis mutation of the real configuration samples through the reader.

Allowed outcomes: a key tree, or one ``VhdxError`` whose message is one line. Anything else, or a read that
takes longer than the alarm, fails. Mutations: byte flips, truncations, and 16/32-bit fields (counts, sizes,
lengths, offsets, data offsets) set to random or extreme values; optionally every checksum is restamped so
the damage reaches the checks behind the CRCs.
"""

from __future__ import annotations

import signal
import struct
import zlib
from contextlib import contextmanager

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.hyperv_oracle import HYPERV_CONFIG, STORAGE_SAMPLES, XML_SAMPLES
from vhdx.errors import VhdxError
from vhdx.hyperv.config import layouts as L
from vhdx.hyperv.config import read_config
from vhdx.hyperv.config.storage import value_size

SECONDS = 5
EXTREMES = (0, 1, 0x7F, 0xFF, 0x800, 0x1000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)

SAMPLES = {name: (HYPERV_CONFIG / name).read_bytes() for name in STORAGE_SAMPLES + XML_SAMPLES}


@contextmanager
def alarm(seconds: int):
    def fail(*_):
        raise TimeoutError(f"reader ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _crc(buf: bytearray, start: int, length: int, at: int) -> None:
    if start + length <= len(buf) and length >= at + 4:
        part = bytearray(buf[start : start + length])
        part[at : at + 4] = bytes(4)
        buf[start + at : start + at + 4] = struct.pack("<I", zlib.crc32(part))


def restamp(buf: bytearray) -> None:
    """Recompute every checksum the reader checks, so mutations reach the structure checks behind them."""
    for off in L.HEADER_OFFSETS:
        _crc(buf, off, L.StorageHeader.sizeof(), L.HEADER_CHECKSUM_OFFSET)
    if len(buf) < 0x2008:
        return
    count = min(struct.unpack_from("<I", buf, 0x2004)[0], 227)
    for n in range(count):
        e = 0x2008 + n * 18
        _crc(buf, e, 18, L.OBJECT_ENTRY_CHECKSUM_OFFSET)
        if e + 18 > len(buf) or buf[e] != L.ObjectType.KEY_TABLE:
            continue
        table, size = struct.unpack_from("<QI", buf, e + 5)
        if table + min(size, 0x1000) > len(buf):
            continue
        _crc(buf, table, 10, L.KEY_TABLE_CHECKSUM_OFFSET)
        pos = 10
        while pos + 21 <= min(size, 0x1000):
            vtype, esize = struct.unpack_from("<HI", buf, table + pos)
            if esize < 21 or pos + esize > size:
                break
            data_offset = buf[table + pos + 20]
            if vtype & 0xFF != L.ValueType.FREE:
                value = bytes(buf[table + pos + 21 + data_offset : table + pos + esize])
                span = 21 + data_offset + value_size(vtype & 0xFF, vtype >> 8, value)
                _crc(buf, table + pos, min(span, esize), L.KEY_ENTRY_CHECKSUM_OFFSET)
            pos += esize


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 0x14000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 0x14000), st.just(0)),
    st.tuples(st.just("u32"), st.integers(0, 0x14000), st.sampled_from(EXTREMES) | st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("u16"), st.integers(0, 0x14000), st.sampled_from(EXTREMES[:7]) | st.integers(0, 0xFFFF)),
    # counts and the fields of the first key entries of the first key table, where lengths live
    st.tuples(st.just("u32"), st.sampled_from([0x2004, 0x3002, 0x3006, 0x300C, 0x3010, 0x3020 + 0x2F]),
              st.sampled_from(EXTREMES)),
    st.tuples(st.just("u8"), st.integers(0x3000, 0x3100), st.sampled_from((0, 1, 2, 9, 10, 0xFF))),
)


def mutate(data: bytes, steps, fix_checksums: bool) -> bytes:
    buf = bytearray(data)
    for kind, offset, value in steps:
        if offset >= len(buf):
            continue
        if kind == "flip":
            buf[offset] ^= value
        elif kind == "truncate":
            del buf[offset:]
        elif kind == "u8":
            buf[offset] = value
        else:
            fmt = "<I" if kind == "u32" else "<H"
            if offset + struct.calcsize(fmt) <= len(buf):
                struct.pack_into(fmt, buf, offset, value)
    if fix_checksums and buf[:4] == struct.pack("<I", L.STORAGE_SIGNATURE):
        restamp(buf)
    return bytes(buf)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], deadline=None)
@given(name=st.sampled_from(sorted(SAMPLES)), steps=st.lists(mutation, min_size=1, max_size=4),
       fix_checksums=st.booleans())
def test_mutated_configuration_reads_to_a_tree_or_one_line_error(tmp_path, name, steps, fix_checksums):
    path = tmp_path / ("m.xml" if name.endswith(".xml") else "m.vmcx")
    path.write_bytes(mutate(SAMPLES[name], steps, fix_checksums))
    with alarm(SECONDS):
        try:
            config = read_config(str(path))
        except VhdxError as exc:
            assert "\n" not in str(exc)
            return
    assert isinstance(config.root, dict)


def test_restamped_unmutated_samples_still_read_the_same():
    for name, data in SAMPLES.items():
        if name.endswith(".xml"):
            continue
        buf = bytearray(data)
        restamp(buf)
        assert bytes(buf) == data, name
