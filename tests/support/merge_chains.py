"""Chains with random content and an in-memory model of their bytes, for the merge tests and benches."""

from __future__ import annotations

import os
import random
from pathlib import Path

import vhdx
from vhdx.ops.create import create

MiB = 1 << 20


def apply_random_ops(disk, model: bytearray, rng: random.Random, count: int, fixed_base: bool) -> None:
    """Random writes (unaligned too), zeroing and trims on ``disk``, mirrored into ``model``."""
    size, bs, lss = len(model), disk.block_size, disk.logical_sector_size
    for _ in range(count):
        kind = rng.choice(("write", "write", "write", "zero", "trim"))
        offset = rng.randrange(0, size)
        length = min(size - offset, rng.choice((rng.randrange(1, 9000), rng.randrange(1, 3 * bs))))
        if kind == "write":
            data = rng.randbytes(length)
            disk.write(offset, data)
            model[offset : offset + length] = data
        elif kind == "zero":
            offset, length = offset // lss * lss, max(lss, length // lss * lss)
            length = min(length, size - offset)
            disk.write_zeros(offset, length)
            model[offset : offset + length] = bytes(length)
        else:
            disk.discard(offset, length)
            if fixed_base and not disk.has_parent:
                continue
            first = -(-offset // bs)
            end = offset + length
            last = end // bs if end < size else -(-size // bs)
            for b in range(first, max(first, last)):
                lo, hi = b * bs, min(size, (b + 1) * bs)
                model[lo:hi] = bytes(hi - lo)


def build_chain(folder: Path, *, size: int = 24 * MiB, base_type: str = "dynamic", base_block: int = 4 * MiB,
                sector: int = 512, child_blocks=(2 * MiB,), seed: int = 0, ops: int = 6,
                child_growth: int = 0) -> tuple[list[Path], bytearray]:
    """Base disk plus one child per entry of ``child_blocks``; returns (paths child first, model bytes)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.vhdx"
    create(base, size, type=base_type, block_size=base_block, logical_sector_size=sector)
    model = bytearray(size)
    with vhdx.open(base, writable=True) as disk:
        apply_random_ops(disk, model, rng, ops, base_type == "fixed")
    paths = [base]
    for i, block in enumerate(child_blocks):
        path = folder / f"snap{i + 1}.avhdx"
        grow = child_growth if i == len(child_blocks) - 1 else 0
        create(path, parent=paths[-1], block_size=block, size=len(model) + grow if grow else None)
        model.extend(bytes(grow))
        with vhdx.open(path, writable=True) as disk:
            apply_random_ops(disk, model, rng, ops, False)
        paths.append(path)
    return paths[::-1], model


def read_view(path, search_dirs=()) -> bytes:
    with vhdx.open(path, search_dirs=search_dirs) as disk:
        return disk.read(0, disk.virtual_size)


def make_merge_workload(folder, allocated: int, *, block_size: int = 2 * MiB, base_block: int = 32 * MiB,
                        virtual_size: int | None = None) -> Path:
    """A base disk and one child holding ``allocated`` bytes of data in whole blocks (benches: merge speed).

    Returns the child's path. The data is incompressible (a random 8 MiB pattern, rotated per step).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    virtual_size = virtual_size or 2 * allocated
    base, child = folder / "base.vhdx", folder / "child.avhdx"
    create(base, virtual_size, block_size=base_block)
    with vhdx.open(base, writable=True) as disk:
        disk.write(0, os.urandom(8 * MiB))
    create(child, parent=base, block_size=block_size)
    pattern = os.urandom(8 * MiB)
    with vhdx.open(child, writable=True) as disk:
        for i, pos in enumerate(range(0, allocated, 8 * MiB)):
            n = min(8 * MiB, allocated - pos)
            disk.write(pos, (pattern[i % 97 :] + pattern[: i % 97])[:n])
    return child
