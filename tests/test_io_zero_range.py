"""``ImageIO.zero_range``: space a writer clears reads as zeros, punched as a hole where the file system can."""

from __future__ import annotations

import os

import pytest

from vhdx import io as io_module
from vhdx.io import ImageIO

MiB = 1 << 20


@pytest.fixture
def filled(tmp_path) -> str:
    path = str(tmp_path / "filled.bin")
    with open(path, "wb") as fh:
        fh.write(b"\xab" * (8 * MiB))
        fh.flush()
        os.fsync(fh.fileno())
    return path


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_zero_range_punches_a_hole_that_reads_as_zeros(filled):
    io = ImageIO.open(filled, writable=True)
    try:
        io.zero_range(2 * MiB, 4 * MiB)
        assert io.read_at(2 * MiB - 1, 4 * MiB + 2) == b"\xab" + bytes(4 * MiB) + b"\xab"
        assert io.data_spans(0, 8 * MiB) == [(0, 2 * MiB), (6 * MiB, 8 * MiB)]
    finally:
        io.close()
    assert os.path.getsize(filled) == 8 * MiB
    assert _allocated(filled) <= 4 * MiB + 64 * 1024


def test_zero_range_writes_zeros_where_holes_cannot_be_punched(filled, monkeypatch):
    monkeypatch.setitem(io_module._LIBC, "fallocate", None)  # a C library without fallocate
    io = ImageIO.open(filled, writable=True)
    try:
        io.zero_range(MiB, MiB)
        assert io.read_at(0, 3 * MiB) == b"\xab" * MiB + bytes(MiB) + b"\xab" * MiB
    finally:
        io.close()
    assert _allocated(filled) >= 8 * MiB  # written, not punched


def test_zero_range_past_the_end_grows_the_file_by_a_hole(filled):
    io = ImageIO.open(filled, writable=True)
    try:
        io.zero_range(7 * MiB, 9 * MiB)
        assert io.real_size == 16 * MiB
        assert io.read_at(7 * MiB, 9 * MiB) == bytes(9 * MiB)
    finally:
        io.close()
    assert _allocated(filled) <= 7 * MiB + 64 * 1024


def test_zero_range_needs_a_writable_open(filled):
    from vhdx.errors import VhdxError

    io = ImageIO.open(filled)
    try:
        with pytest.raises(VhdxError, match="read-only"):
            io.zero_range(0, MiB)
    finally:
        io.close()
    with open(filled, "rb") as fh:
        assert fh.read(16) == b"\xab" * 16


def test_write_zeros_past_one_copy_chunk_overwrites_exactly_its_range(tmp_path):
    size, offset, length = 12 * MiB, 5, io_module.COPY_CHUNK + 4096 + 7  # two writes: a whole chunk and the rest
    path = tmp_path / "filled.bin"
    path.write_bytes(b"\xab" * size)
    io = ImageIO.open(str(path), writable=True)
    try:
        io.write_zeros(offset, length)
        io.write_zeros(MiB, 0)  # nothing
    finally:
        io.close()
    assert path.read_bytes() == b"\xab" * offset + bytes(length) + b"\xab" * (size - offset - length)


def test_zero_writes_share_one_read_only_buffer_of_zeros():
    zeros = io_module.zero_pages()
    assert zeros is io_module.zero_pages()
    assert zeros.readonly and len(zeros) == io_module.COPY_CHUNK
    assert not any(zeros[:: 4096]) and zeros[-1] == 0
