"""Helpers for the forensic tests: small chains built with vhdx.ops.create + image.write, and a file guard."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import vhdx
from vhdx.ops.create import create

MiB = 1 << 20


def pattern(seed: int, length: int) -> bytes:
    """Deterministic bytes with no zero byte (so written data is never mistaken for a hole)."""
    rng = random.Random(seed)
    unit = bytes(rng.randrange(1, 256) for _ in range(4093))  # odd length: repeats do not line up with sectors
    return (unit * (length // len(unit) + 1))[:length]


def build_chain(folder: Path, layers: list[list[tuple]], *, size: int = 8 * MiB, block_sizes=None,
                logical_sector_size: int = 512) -> list[Path]:
    """Create base + children; ``layers[i]`` is a list of ("write", offset, data) / ("zero"|"discard", off, len)."""
    paths = []
    for depth, ops in enumerate(layers):
        bs = (block_sizes or [MiB] * len(layers))[depth]
        path = folder / (f"layer{depth}.vhdx" if depth == 0 else f"layer{depth}.avhdx")
        if depth == 0:
            create(path, size, block_size=bs, logical_sector_size=logical_sector_size)
        else:
            create(path, parent=paths[-1], block_size=bs)
        with vhdx.open(path, writable=True) as image:
            for op, offset, arg in ops:
                if op == "write":
                    image.write(offset, arg)
                elif op == "zero":
                    image.write_zeros(offset, arg)
                else:
                    image.discard(offset, arg)
        paths.append(path)
    return paths


class FileGuard:
    """Remembers the sha256 and mtime of files, to prove a command left them untouched."""

    def __init__(self, paths) -> None:
        self.before = {Path(p): self._state(p) for p in paths}

    @staticmethod
    def _state(path) -> tuple[str, int, int]:
        st = os.stat(path)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size

    def assert_unchanged(self) -> None:
        for path, state in self.before.items():
            assert self._state(path) == state, f"{path} changed"
