"""What reading costs in system calls and parses: fstat once per read-only open, metadata items in one pread,
layouts parsed often compiled without changing a result or an error message."""

from __future__ import annotations

import os

import pytest
from construct import GreedyBytes, NullStripped, PaddedString
from hypothesis import given
from hypothesis import strategies as st

import vhdx
import vhdx.io as vio
from vhdx.disk.image import read_structures
from vhdx.errors import FormatError
from vhdx.format import layouts
from vhdx.ops.create import create

MiB = 1 << 20


@pytest.fixture
def child(tmp_path):
    base, child = os.fspath(tmp_path / "base.vhdx"), os.fspath(tmp_path / "child.avhdx")
    create(base, 8 * MiB, block_size=MiB)
    with vhdx.open(base, writable=True) as image:
        image.write(0, b"\x11" * 4 * MiB)
    create(child, parent=base, block_size=MiB)
    with vhdx.open(child, writable=True) as image:
        for offset in range(0, 4 * MiB, 64 * 1024):
            image.write(offset, b"\x22" * 4096)
    return child


def test_reads_through_a_read_only_chain_take_fstat_once_per_file(child, monkeypatch):
    with vhdx.open(child) as image:
        image.read(0, 8 * MiB)
        calls = []
        real = os.fstat
        monkeypatch.setattr(os, "fstat", lambda fd: calls.append(fd) or real(fd))
        for offset in range(0, 8 * MiB, 4096 * 7):
            image.read(offset, 4096)
    assert calls == []


def test_writable_open_sees_its_file_grow(tmp_path):
    path = os.fspath(tmp_path / "d.vhdx")
    create(path, 8 * MiB, block_size=MiB)
    with vhdx.open(path, writable=True) as image:
        before = image.io.real_size
        image.write(0, b"\x01" * MiB)
        assert image.io.real_size > before


def test_metadata_table_and_items_are_read_with_one_pread(child, monkeypatch):
    reads = []  # file offsets of every positional read, whichever call makes it
    pread, preadv = os.pread, os.preadv
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: reads.append(offset) or pread(fd, n, offset))
    monkeypatch.setattr(os, "preadv", lambda fd, views, offset: reads.append(offset) or preadv(fd, views, offset))
    image = read_structures(child)
    metadata_start = image.regions.metadata.file_offset
    in_region = [o for o in reads if metadata_start <= o < metadata_start + image.regions.metadata.length]
    assert in_region == [metadata_start]
    assert image.params.parent_locator is not None and image.params.has_parent


def test_compiled_layouts_parse_to_the_same_structures(child, monkeypatch):
    monkeypatch.setattr(vio, "COMPILE_AFTER", 10**9)
    plain = read_structures(child)
    monkeypatch.setattr(vio, "COMPILE_AFTER", 1)
    compiled = read_structures(child)
    assert vio._compiled  # the layouts really were compiled
    for attribute in ("creator", "headers", "regions", "metadata", "log"):
        assert repr(getattr(compiled, attribute)) == repr(getattr(plain, attribute))


def test_compiled_layout_reports_the_layouts_own_error(monkeypatch):
    monkeypatch.setattr(vio, "COMPILE_AFTER", 1)
    bad = b"nothead!" + bytes(layouts.Header.sizeof() - 8)
    with pytest.raises(FormatError) as compiled:
        vio.parse_bytes(layouts.Header, bad, offset=0x10000, structure="Header 1")
    monkeypatch.setattr(vio, "_compiled", {})
    monkeypatch.setattr(vio, "COMPILE_AFTER", 10**9)
    with pytest.raises(FormatError) as plain:
        vio.parse_bytes(layouts.Header, bad, offset=0x10000, structure="Header 1")
    assert str(compiled.value) == str(plain.value)


@given(st.text(alphabet=st.sampled_from("Az\x00\u00e9\u0100\U0001f600"), max_size=120))
def test_creator_field_parses_as_construct_padded_string(text):
    raw = text.encode("utf-16-le")[:512].ljust(512, b"\x00")
    reference = PaddedString(512, "utf-16-le")
    try:
        want = reference.parse(raw)
    except Exception as exc:  # a cut surrogate pair: both must refuse it alike
        with pytest.raises(type(exc)):
            layouts.FileIdentifier.subcons[1].parse(raw)
        return
    assert layouts.FileIdentifier.subcons[1].parse(raw) == want


@given(st.binary(max_size=16), st.sampled_from([b"\x00", b"\x00\x00", b"\x00" * 4]))
def test_nul_stripping_matches_construct(data, pad):
    assert layouts._NulUnitsStripped(GreedyBytes, pad=pad).parse(data) == NullStripped(GreedyBytes, pad=pad).parse(data)
