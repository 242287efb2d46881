"""``merge --verify``: the chain's view before the merge against the destination's view after it, block by block.

Only blocks that some layer holds data for (DATA extents of the chain's view) are read: every other block reads
as zeros by its BAT states, and costs nothing whatever the virtual size. Before the merge, a 16-byte digest is
kept for each such block whose bytes are not all zeros (a sorted array of block numbers beside one of digests);
after it, the destination's data blocks are read and compared with those digests or with zeros, and a block kept
before that the destination no longer holds data for differs. It is the bytes that count, not the allocation: a
block held as data whose bytes are zeros equals a block that reads as zeros by its state. Memory and time follow
the data held, one extent window at a time (a 64 TiB disk with a few MiB of data takes seconds).

References: [MS-VHDX] §2.5.1.1 (how payload block states read).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vhdx.disk.extents import ExtentKind
from vhdx.disk.image import WINDOW_BLOCKS, VhdxImage
from vhdx.format import constants as c
from vhdx.io import COPY_CHUNK
from vhdx.structures.bat import ceil_div

DIGEST_SIZE = 16


@dataclass(frozen=True)
class ViewDigests:
    """The digest of each ``block_size`` piece of a view that reads anything but zeros; all others read zeros."""

    block_size: int
    size: int  # virtual bytes compared
    blocks: np.ndarray  # int64, sorted: the pieces that hold a non-zero byte
    digests: np.ndarray  # (len(blocks), DIGEST_SIZE) uint8


@dataclass(frozen=True)
class Difference:
    """How many blocks of two views differ, and the first of them (None when none does)."""

    count: int
    first: int | None


def _hasher():
    return hashlib.blake2b(digest_size=DIGEST_SIZE)


def _windows(image: VhdxImage, block_size: int, size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(first block, end block, sorted data blocks) per window of ``block_size`` pieces of [0, size).

    A data block is one that a DATA extent of the chain's view touches; the others read as zeros (ZERO extents,
    or ABSENT at the base). Beyond the image's end the view reads zeros too.
    """
    count = ceil_div(size, block_size)
    # Windows of the span the extents machinery takes at once for the smallest blocks: never more than
    # WINDOW_BLOCKS blocks of any layer's per-block arrays, whatever the block size compared.
    per = max(1, WINDOW_BLOCKS * c.MIN_BLOCK_SIZE // block_size)
    for b0 in range(0, count, per):
        b1 = min(count, b0 + per)
        lo, hi = b0 * block_size, min(b1 * block_size, size, image.virtual_size)
        if hi <= lo:
            yield b0, b1, np.zeros(0, np.int64)
            continue
        ext = image.extents(lo, hi)
        data = ext.kind == ExtentKind.DATA
        first, last = ext.start[data] // block_size, (ext.end[data] - 1) // block_size
        # Every block from first to last of each extent (extents are sorted, so only neighbours share a block).
        counts = last - first + 1
        steps = np.ones(int(counts.sum()), np.int64)
        heads = np.cumsum(counts) - counts
        steps[heads] = first - np.concatenate(([0], last[:-1]))
        yield b0, b1, np.unique(np.cumsum(steps))


def _block_digests(image: VhdxImage, blocks: np.ndarray, block_size: int, size: int
                   ) -> Iterator[tuple[int, bytes, int]]:
    """(block, digest, length) of each of the sorted ``blocks``, its last block cut at ``size``.

    Runs of neighbouring blocks are read COPY_CHUNK bytes at a time and each block is digested piece by piece,
    so a block is never held whole (a block may be 256 MiB).
    """
    if not len(blocks):
        return
    view = memoryview(bytearray(min(COPY_CHUNK, block_size * len(blocks))))
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    for run in np.split(blocks, breaks):
        block, end = int(run[0]), min((int(run[-1]) + 1) * block_size, size)
        pos, hasher = block * block_size, _hasher()
        while pos < end:
            n = min(len(view), end - pos)
            got = image.readinto(pos, view[:n])
            view[got:n] = bytes(n - got)
            done = 0
            while done < n:
                block_end = min((block + 1) * block_size, end)
                take = min(n - done, block_end - pos - done)
                hasher.update(view[done : done + take])
                done += take
                if pos + done == block_end:
                    yield block, hasher.digest(), block_end - block * block_size
                    block, hasher = block + 1, _hasher()
            pos += n


class _ZeroDigests:
    """The digest of an all-zero piece, per length (every block but perhaps the last has the same length)."""

    def __init__(self) -> None:
        self._by_length: dict[int, bytes] = {}

    def __call__(self, length: int) -> bytes:
        found = self._by_length.get(length)
        if found is None:
            hasher, zeros = _hasher(), bytes(min(length, COPY_CHUNK))
            for pos in range(0, length, len(zeros)):
                hasher.update(zeros[: length - pos])
            found = self._by_length[length] = hasher.digest()
        return found


def digest_view(image: VhdxImage, block_size: int, size: int | None = None) -> ViewDigests:
    """The digests of the pieces of ``image``'s view (through its chain) that hold a non-zero byte."""
    size = image.virtual_size if size is None else size
    zero = _ZeroDigests()
    kept_blocks: list[np.ndarray] = []
    kept_digests: list[np.ndarray] = []
    for _b0, _b1, data in _windows(image, block_size, size):
        digests = np.empty((len(data), DIGEST_SIZE), np.uint8)
        nonzero = np.zeros(len(data), bool)
        for i, (_b, digest, length) in enumerate(_block_digests(image, data, block_size, size)):
            digests[i] = np.frombuffer(digest, np.uint8)
            nonzero[i] = digest != zero(length)
        if nonzero.any():
            kept_blocks.append(data[nonzero])
            kept_digests.append(digests[nonzero])
    if not kept_blocks:
        return ViewDigests(block_size, size, np.zeros(0, np.int64), np.zeros((0, DIGEST_SIZE), np.uint8))
    return ViewDigests(block_size, size, np.concatenate(kept_blocks), np.concatenate(kept_digests))


def compare_view(before: ViewDigests, image: VhdxImage) -> Difference:
    """The blocks of ``image``'s view that differ from the view ``before`` was taken of."""
    bs, size = before.block_size, before.size
    zero = _ZeroDigests()
    count, first = 0, None
    for b0, b1, data in _windows(image, bs, size):
        i0, i1 = np.searchsorted(before.blocks, [b0, b1])
        kept, digests = before.blocks[i0:i1], before.digests[i0:i1]
        # Kept before, and reading zeros now by the destination's states.
        differ = kept[~np.isin(kept, data, assume_unique=True)].tolist()
        was_kept = np.isin(data, kept, assume_unique=True).tolist()
        where = np.searchsorted(kept, data).tolist()
        for (b, digest, length), i, known in zip(_block_digests(image, data, bs, size), where, was_kept,
                                                 strict=True):
            if digest != (digests[i].tobytes() if known else zero(length)):
                differ.append(b)
        if differ:
            count += len(differ)
            first = min(differ) if first is None else first
    return Difference(count, first)
