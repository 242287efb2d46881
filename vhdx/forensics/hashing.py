"""Hashes of a virtual disk as its chain presents it, and of every layer file, in one pass per input.

The virtual disk hash is what a flattened raw image hashes to (``vhdx convert -O raw`` then ``sha256sum``).
Runs that read as zeros (ZERO blocks, or nothing in any layer) are fed to the hashers from one shared zero
buffer without touching the files. Reads run one chunk ahead of hashing in a helper thread, and several
algorithms hash the same chunk in parallel threads (hashlib releases the GIL on large updates).

References: [MS-VHDX] §2.5.1.1 (which block states read as zeros).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from vhdx.disk.extents import ExtentKind
from vhdx.disk.image import VhdxImage
from vhdx.errors import InvalidRequestError, VhdxError

CHUNK = 8 * 1024 * 1024
DEFAULT_ALGORITHMS = ("sha256",)
_ZEROS = memoryview(bytes(CHUNK))

# A piece of input: (reader, offset, length); reader None means "length zero bytes".
Piece = tuple[Callable[[int, memoryview], None] | None, int, int]


def check_algorithms(names: Iterable[str]) -> tuple[str, ...]:
    """Normalise and validate algorithm names (those every Python build has, e.g. md5, sha1, sha256)."""
    out = []
    for name in names:
        key = name.strip().lower().replace("-", "")
        key = {"sha3256": "sha3_256", "sha3512": "sha3_512"}.get(key, key)
        if key not in hashlib.algorithms_guaranteed or key.startswith("shake"):
            choices = ", ".join(sorted(a for a in hashlib.algorithms_guaranteed if not a.startswith("shake")))
            raise InvalidRequestError(f"unknown hash algorithm {name!r} (choose from {choices})")
        if key not in out:
            out.append(key)
    if not out:
        raise InvalidRequestError("no hash algorithm given")
    return tuple(out)


class MultiHasher:
    """Feeds every byte to one hasher per algorithm, and optionally to per-piece hashers."""

    def __init__(self, algorithms: tuple[str, ...], piece_size: int | None = None) -> None:
        self.algorithms = algorithms
        self.total = [hashlib.new(a) for a in algorithms]
        self.piece_size = piece_size
        self.pieces: list[dict[str, str]] = []
        self._piece = [hashlib.new(a) for a in algorithms] if piece_size else []
        self._piece_fill = 0
        self.position = 0
        self._pool = ThreadPoolExecutor(len(algorithms) * (2 if piece_size else 1)) if len(algorithms) > 1 else None

    def _update_all(self, hashers: list, view: memoryview) -> None:
        if self._pool is None or len(view) < 65536:
            for h in hashers:
                h.update(view)
            return
        for future in [self._pool.submit(h.update, view) for h in hashers]:
            future.result()

    def update(self, view: memoryview) -> None:
        if not self.piece_size:
            self._update_all(self.total, view)
            self.position += len(view)
            return
        pos = 0
        while pos < len(view):
            n = min(len(view) - pos, self.piece_size - self._piece_fill)
            part = view[pos : pos + n]
            self._update_all(self.total + self._piece, part)
            self._piece_fill += n
            pos += n
            if self._piece_fill == self.piece_size:
                self._close_piece()
        self.position += len(view)

    def _close_piece(self) -> None:
        self.pieces.append({a: h.hexdigest() for a, h in zip(self.algorithms, self._piece, strict=True)})
        self._piece = [hashlib.new(a) for a in self.algorithms]
        self._piece_fill = 0

    def finish(self) -> dict[str, str]:
        if self.piece_size and self._piece_fill:
            self._close_piece()
        if self._pool is not None:
            self._pool.shutdown()
        return {a: h.hexdigest() for a, h in zip(self.algorithms, self.total, strict=True)}


def feed(pieces: Iterable[Piece], sink: MultiHasher, progress: Callable[[int], None] | None = None) -> int:
    """Read ``pieces`` (one chunk ahead, in a helper thread) into ``sink``; returns the bytes read from files."""
    buffers = (bytearray(CHUNK), bytearray(CHUNK))
    read_bytes = 0

    def load(piece: Piece, buf: bytearray) -> memoryview:
        reader, offset, length = piece
        if reader is None:
            return _ZEROS[:length]
        view = memoryview(buf)[:length]
        reader(offset, view)
        return view

    with ThreadPoolExecutor(1) as prefetch:
        pending = None
        turn = 0
        for piece in _split(pieces):
            future = prefetch.submit(load, piece, buffers[turn])
            turn ^= 1
            if piece[0] is not None:
                read_bytes += piece[2]
            if pending is not None:
                sink.update(pending.result())
                if progress:
                    progress(sink.position)
            pending = future
        if pending is not None:
            sink.update(pending.result())
            if progress:
                progress(sink.position)
    return read_bytes


def _split(pieces: Iterable[Piece]) -> Iterator[Piece]:
    """Cut pieces into chunks no longer than CHUNK (the buffer size)."""
    for reader, offset, length in pieces:
        pos = 0
        while pos < length:
            n = min(CHUNK, length - pos)
            yield reader, offset + pos, n
            pos += n


def image_pieces(image: VhdxImage, start: int = 0, end: int | None = None) -> Iterator[Piece]:
    """Pieces of the virtual disk [start, end) through the chain; zero-reading runs are not read."""
    end = image.virtual_size if end is None else end
    layers = [image]
    for run_start, length, kind, layer, file_offset in image.extents(start, end).rows():
        if kind == ExtentKind.DATA:
            while len(layers) <= layer:
                layers.append(layers[-1].parent)
            yield layers[layer].io.readinto_at, file_offset, length
        else:
            yield None, run_start, length


def zero_pieces(length: int) -> Iterator[Piece]:
    yield None, 0, length


def file_pieces(fd: int, size: int) -> Iterator[Piece]:
    """Pieces of a whole file; holes of a sparse file (SEEK_HOLE) are fed as zeros without reading."""

    def reader(offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                view[done:] = bytes(len(view) - done)
                return
            done += n

    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            data = size  # ENXIO: only a hole remains (or SEEK_DATA is unsupported: see below)
        if data > pos:
            yield None, pos, min(data, size) - pos
            pos = min(data, size)
            continue
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = size
        hole = min(max(hole, pos + 1), size)
        yield reader, pos, hole - pos
        pos = hole


@dataclass(frozen=True)
class FileHash:
    depth: int
    path: str
    size: int
    digests: dict[str, str]


@dataclass(frozen=True)
class DiskHash:
    """Result of ``hash_disk``: the virtual disk's digests, optional piece digests, each layer file's digests."""

    path: str
    virtual_size: int
    algorithms: tuple[str, ...]
    digests: dict[str, str]
    piece_size: int | None
    pieces: list[dict[str, str]]
    layers: list[FileHash]
    orphan: bool
    absent: list[tuple[int, int]]  # (start, length) not held by any layer: read as zeros (orphan mode)
    bytes_read: int
    seconds: float
    zero_bytes: int = field(default=0)

    def to_json(self) -> dict:
        out = asdict(self)
        out["algorithms"] = list(self.algorithms)
        out["pieces"] = [{"index": i, "offset": i * self.piece_size,
                          "length": min(self.piece_size, self.virtual_size - i * self.piece_size), "digests": d}
                         for i, d in enumerate(self.pieces)] if self.piece_size else []
        out["absent"] = [{"start": s, "length": n} for s, n in self.absent]
        return out


def hash_virtual(image: VhdxImage, algorithms=DEFAULT_ALGORITHMS, piece_size: int | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[dict[str, str], list[dict[str, str]], int]:
    """Digests of the whole virtual disk (and of each piece); returns (digests, pieces, bytes read)."""
    if piece_size is not None and piece_size <= 0:
        raise InvalidRequestError(f"piece size must be positive (got {piece_size})")
    sink = MultiHasher(check_algorithms(algorithms), piece_size)
    read = feed(image_pieces(image), sink, progress)
    return sink.finish(), sink.pieces, read


def hash_file(path: str, algorithms=DEFAULT_ALGORITHMS) -> tuple[int, dict[str, str]]:
    """Digests of a file's bytes as stored (opened read-only); returns (size, digests)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise VhdxError(f"cannot open: {exc.strerror}", path=path) from None
    try:
        size = os.fstat(fd).st_size
        sink = MultiHasher(check_algorithms(algorithms))
        try:
            feed(file_pieces(fd, size), sink)
        except OSError as exc:
            raise VhdxError(f"read failed: {exc.strerror}", path=path) from None
        return size, sink.finish()
    finally:
        os.close(fd)


def hash_disk(image: VhdxImage, algorithms=DEFAULT_ALGORITHMS, piece_size: int | None = None, *,
              layer_files: bool = True, progress: Callable[[int], None] | None = None) -> DiskHash:
    """Hash the virtual disk seen through ``image``'s chain, and (by default) every layer file."""
    algorithms = check_algorithms(algorithms)
    began = time.monotonic()
    extents = image.extents()
    absent = extents.kind == ExtentKind.ABSENT
    zero = int(extents.length[extents.kind != ExtentKind.DATA].sum())
    digests, pieces, read = hash_virtual(image, algorithms, piece_size, progress)
    layers = []
    if layer_files:
        for depth, layer in enumerate(image.layers):
            size, file_digests = hash_file(layer.path, algorithms)
            layers.append(FileHash(depth, os.path.abspath(layer.path), size, file_digests))
    return DiskHash(
        path=os.path.abspath(image.path), virtual_size=image.virtual_size, algorithms=algorithms, digests=digests,
        piece_size=piece_size, pieces=pieces, layers=layers, orphan=image.options.orphan and image.has_parent,
        absent=list(zip(extents.start[absent].tolist(), extents.length[absent].tolist(), strict=True))
        if image.options.orphan and image.has_parent else [],
        bytes_read=read, seconds=time.monotonic() - began, zero_bytes=zero)
