"""Deterministic benchmark disks, built with the library's own writer (``vhdx.ops.create`` + ``image.write``).

Every byte and every offset comes from a seeded generator, so two runs with the same profile build
identical virtual disks (the file GUIDs differ, as with any new file).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import vhdx
from vhdx.ops.create import create
from vhdx_cli.storage_bench import CHUNK, Payload, data_bytes_of, write_merge_chain, write_range  # noqa: F401

from .sizes import MiB, Profile, human_size

CHAIN_BLOCK_SIZE = 2 * MiB


@dataclass(frozen=True)
class Workload:
    """One benchmark disk: ``layers`` lists its files base first; ``path`` is the one opened (the top)."""

    name: str
    description: str
    layers: tuple[str, ...]
    virtual_size: int
    qemu_readable: bool
    data_bytes: int = 0  # bytes the virtual disk holds as data (what a flatten copies)
    top_data_bytes: int = 0  # bytes of data in the top file alone (what a merge of it copies)
    extra: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.layers[-1]

    @property
    def depth(self) -> int:
        return len(self.layers) - 1


def _finish(w: Workload) -> Workload:
    total, top = data_bytes_of(w.path)
    return Workload(w.name, w.description, w.layers, w.virtual_size, w.qemu_readable, total, top, w.extra)


def dynamic_disk(folder: str, name: str, size: int, fill: float, seed: int, *, logical_sector_size: int = 512,
                 block_size: int | None = None) -> Workload:
    """A dynamic disk with a seeded ``fill`` fraction of its blocks written whole."""
    path = os.path.join(folder, f"{name}.vhdx")
    create(path, size, block_size=block_size, logical_sector_size=logical_sector_size, creator="vhdx-benches")
    with vhdx.open(path, writable=True) as image:
        bs = image.block_size
        blocks = -(-size // bs)
        chosen = sorted(random.Random(seed).sample(range(blocks), max(1, round(blocks * fill))))
        payload = Payload(seed)
        for b in chosen:
            write_range(image, payload, b * bs, min(bs, size - b * bs))
    desc = f"dynamic, {fill:.0%} of {blocks} blocks of {bs // MiB} MiB written"
    if logical_sector_size != 512:
        desc += f", {logical_sector_size}-byte logical sectors"
    return _finish(Workload(name, desc, (path,), size, qemu_readable=logical_sector_size == 512))


def chain(folder: str, name: str, profile: Profile, pattern: str, seed: int) -> list[Workload]:
    """A base disk (half full) and children up to the deepest profile depth; one Workload per measured depth.

    ``pattern`` is "random" (``profile.random_writes`` random 4 KiB writes per child) or "sequential"
    (``profile.sequential_writes`` large writes per child at random 1 MiB-aligned places). All layers use
    2 MiB blocks (the Hyper-V checkpoint default) so that dissect.hypervisor, which misreads a parent whose
    block size differs from the child's, reads these chains right.
    """
    size = profile.chain_size
    base = dynamic_disk(folder, f"{name}-base", size, 0.5, seed, block_size=CHAIN_BLOCK_SIZE)
    layers = [base.path]
    rng = random.Random(seed)
    payload = Payload(seed + 1)
    out = []
    for depth in range(1, max(profile.chain_depths) + 1):
        path = os.path.join(folder, f"{name}-{depth}.avhdx")
        create(path, parent=layers[-1], creator="vhdx-benches")
        with vhdx.open(path, writable=True) as image:
            if pattern == "random":
                for _ in range(profile.random_writes):
                    offset = rng.randrange(size // 4096) * 4096
                    image.write(offset, payload.chunk(offset, 4096))
            else:
                count, length = profile.sequential_writes
                for _ in range(count):
                    offset = rng.randrange((size - length) // MiB + 1) * MiB
                    write_range(image, payload, offset, length)
        layers.append(path)
        if depth in profile.chain_depths:
            if pattern == "random":
                desc = f"chain depth {depth}: {profile.random_writes} random 4 KiB writes per child"
            else:
                count, length = profile.sequential_writes
                desc = f"chain depth {depth}: {count} sequential writes of {length // MiB} MiB per child"
            out.append(_finish(Workload(f"{name}-d{depth}", desc + ", base half full, 2 MiB blocks",
                                        tuple(layers), size, qemu_readable=False)))
    return out


def merge_chain(folder: str, size: int, child_bytes: int, *, name: str = "merge", creator: str = "vhdx-benches"
                ) -> Workload:
    """A dynamic parent with a quarter of ``size`` written and a child holding ``child_bytes`` in 8 MiB writes."""
    parent = os.path.join(folder, f"{name}-base.vhdx")
    child = os.path.join(folder, f"{name}-1.avhdx")
    written = write_merge_chain(parent, child, size, child_bytes, creator)
    desc = (f"parent {human_size(size)} dynamic (32 MiB blocks, a quarter written), child with "
            f"{human_size(written)} in 8 MiB writes (2 MiB blocks)")
    return _finish(Workload(f"{name}-d1", desc, (parent, child), size, qemu_readable=False))


def sparse_disk(folder: str, profile: Profile, seed: int) -> Workload:
    """A huge dynamic disk with 1 MiB blocks and a few blocks written across its whole range."""
    path = os.path.join(folder, "sparse.vhdx")
    size = profile.sparse_size
    create(path, size, block_size=MiB, creator="vhdx-benches")
    rng = random.Random(seed)
    offsets = sorted(rng.randrange(size // MiB) * MiB for _ in range(profile.sparse_writes))
    payload = Payload(seed)
    with vhdx.open(path, writable=True) as image:
        for offset in offsets:
            image.write(offset, payload.chunk(offset, MiB))
    # Its data bytes are known; walking a 64 TiB BAT again just to count them would cost seconds.
    data = len(set(offsets)) * MiB
    return Workload("sparse", f"dynamic {human_size(size)}, 1 MiB blocks, {len(offsets)} blocks written", (path,),
                    size, qemu_readable=True, data_bytes=data, top_data_bytes=data, extra={"offsets": offsets})


FAMILIES = ("dynamic", "sector4k", "chains", "sparse", "merge")


def build_all(folder: str, profile: Profile, seed: int = 7, families=FAMILIES) -> dict[str, list[Workload]]:
    """The workloads of a profile, grouped by family (only the families asked for are built)."""
    builders = {
        "dynamic": lambda: [dynamic_disk(folder, "dyn25", profile.dynamic_size, 0.25, seed),
                            dynamic_disk(folder, "dyn75", profile.dynamic_size, 0.75, seed + 1)],
        "sector4k": lambda: [dynamic_disk(folder, "sector4k", profile.dynamic_size, 0.5, seed + 2,
                                          logical_sector_size=4096)],
        "chains": lambda: chain(folder, "rand4k", profile, "random", seed + 3)
        + chain(folder, "seq", profile, "sequential", seed + 4),
        "sparse": lambda: [sparse_disk(folder, profile, seed + 5)],
        "merge": lambda: [merge_chain(folder, 2 * profile.merge_child_bytes, profile.merge_child_bytes)],
    }
    return {name: builders[name]() if name in families else [] for name in FAMILIES}
