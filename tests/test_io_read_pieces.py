"""``ImageIO.read_pieces``: many pieces read with one ``preadv`` each, exactly as ``readinto_at`` reads them."""

from __future__ import annotations

import contextlib
import os

from vhdx.io import ImageIO, Overlay

SIZE = 5 * 4096


def _file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


def _one_by_one(io, pieces, length):
    expected = bytearray(b"\xee" * length)
    for lo, hi, offset in pieces:
        io.readinto_at(offset, memoryview(expected)[lo:hi])
    return expected


def test_pieces_inside_the_file_read_the_file_bytes(tmp_path):
    path = _file(tmp_path)
    pieces = [(0, 4096, 8192), (4096, 4608, 100), (6000, 7000, 0)]
    with contextlib.closing(ImageIO.open(str(path))) as io:
        buf = bytearray(b"\xee" * 8192)
        io.read_pieces(memoryview(buf), pieces)
        assert buf == _one_by_one(io, pieces, 8192)
    data = path.read_bytes()
    assert buf[:4096] == data[8192:12288] and buf[6000:7000] == data[:1000]


def test_a_piece_that_reaches_past_the_end_of_the_file_reads_zeros_there(tmp_path):
    path = _file(tmp_path)
    pieces = [(0, 8192, SIZE - 4096), (8192, 12288, SIZE + 4096)]
    with contextlib.closing(ImageIO.open(str(path))) as io:
        buf = bytearray(b"\xee" * 12288)
        io.read_pieces(memoryview(buf), pieces)
        assert buf == _one_by_one(io, pieces, 12288)
    assert buf[:4096] == path.read_bytes()[-4096:] and buf[4096:] == bytes(8192)


def test_pieces_of_a_file_seen_through_a_log_replay_read_the_replayed_sectors(tmp_path):
    path = _file(tmp_path)
    with contextlib.closing(ImageIO.open(str(path))) as io:
        io.overlay = Overlay({4096: b"\x5a" * 4096}, [(12288, 100)], SIZE)
        pieces = [(0, 8192, 0), (8192, 12288, 12288)]
        buf = bytearray(12288)
        io.read_pieces(memoryview(buf), pieces)
        assert buf == _one_by_one(io, pieces, 12288)
    assert buf[4096:8192] == b"\x5a" * 4096 and buf[8192:8292] == bytes(100)
