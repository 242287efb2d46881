"""``vhdx bench``: merge and flatten throughput on the user's own storage, against its raw copy bandwidth.

No peers are needed: the yardstick is ``os.copy_file_range`` of the same number of bytes in the same folder.
Runs are cold-cache for the inputs: every input file is fsynced and dropped from the page cache with
``posix_fadvise(DONTNEED)`` before each timed run, so reads come from the storage, as in a real merge.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

import vhdx
from vhdx.disk.extents import ExtentKind
from vhdx.errors import InvalidRequestError
from vhdx.ops.export import export_raw
from vhdx_cli.bench_timing import Method, copy_file_range_all, remove, run_methods

MiB = 1 << 20
CHUNK = 8 * MiB

MIN_SIZE = 64 * MiB
FREE_FACTOR = 2.2  # peak use: chain + a copy of it + flat output + copy source/target, each ~half the size


@dataclass(frozen=True)
class Row:
    operation: str
    status: str  # ok | missing | failed
    note: str
    bytes: int
    seconds: float | None  # median
    min_seconds: float | None
    mib_per_s: float | None
    vs_raw_copy: float | None  # our time / raw copy time of the same bytes (1.0 = at the limit)


@dataclass(frozen=True)
class StorageBench:
    folder: str
    filesystem: str
    virtual_size: int
    repeats: int
    rows: tuple[Row, ...]

    def to_json(self) -> dict:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


def drop_cache(paths) -> None:
    """Write back and evict these files from the page cache (no privileges needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class Payload:
    """Seeded, cheap, incompressible payload: views into one random pool, each chunk stamped with its offset."""

    def __init__(self, seed: int, pool_size: int = 2 * CHUNK) -> None:
        self.pool = np.random.default_rng(seed).integers(0, 256, pool_size, dtype=np.uint8)
        self.seed = seed

    def chunk(self, offset: int, length: int) -> bytes:
        start = (offset * 2654435761 + self.seed) % (len(self.pool) - length + 1) if length < len(self.pool) else 0
        buf = bytearray(self.pool[start : start + length].tobytes())
        buf[:8] = offset.to_bytes(8, "little")
        return bytes(buf)


def write_range(image, payload: Payload, offset: int, length: int) -> None:
    pos = offset
    while pos < offset + length:
        n = min(CHUNK, offset + length - pos)
        image.write(pos, payload.chunk(pos, n))
        pos += n


def data_bytes_of(path: str) -> tuple[int, int]:
    """(data bytes of the whole virtual disk, data bytes held by the file itself)."""
    with vhdx.open(path) as image:
        ext = image.extents()  # walks the disk in windows: fine for 64 TiB
        total = int(ext.length[ext.kind == ExtentKind.DATA].sum())
        if not image.has_parent:
            return total, total
        own = image.layer_extents(0, image.virtual_size)  # one array per block: only for the small chains
        top = int(own.length[own.kind == ExtentKind.DATA].sum())
    return total, top


def write_merge_chain(parent: str, child: str, size: int, child_bytes: int, creator: str) -> int:
    """A dynamic parent with a quarter of ``size`` written and a child holding ``child_bytes`` in 8 MiB writes.

    Returns the bytes the child holds.
    """
    vhdx.create_image(parent, size, creator=creator)
    quarter = size // 4 // CHUNK * CHUNK or CHUNK
    with vhdx.open(parent, writable=True) as image:
        write_range(image, Payload(1), 0, quarter)
    vhdx.create_image(child, parent=parent, creator=creator)
    slots = random.Random(2).sample(range(size // CHUNK), max(1, min(child_bytes, size) // CHUNK))
    payload = Payload(3)
    with vhdx.open(child, writable=True) as image:
        for slot in sorted(slots):
            image.write(slot * CHUNK, payload.chunk(slot * CHUNK, CHUNK))
    return len(slots) * CHUNK


def filesystem_of(path: str) -> str:
    out = subprocess.run(["df", "--output=fstype", path], capture_output=True, text=True).stdout.split()
    return out[-1] if len(out) > 1 else "unknown"


def measure_storage(folder: str, size: int = 4 << 30, *, repeats: int = 3,
                    progress: Callable[[str], None] | None = None) -> StorageBench:
    """Build a parent+child chain of ``size`` virtual bytes in ``folder`` and time flatten and merge there.

    Everything is created in a temporary sub-folder and removed at the end.
    """
    folder = os.fspath(folder)
    if size < MIN_SIZE:
        raise InvalidRequestError(f"--size must be at least {MIN_SIZE >> 20} MiB (got {size})")
    if not os.path.isdir(folder):
        raise InvalidRequestError(f"{folder} is not a folder")
    need = int(size * FREE_FACTOR / 2)  # the disk is half written; every file scales with the data
    free = shutil.disk_usage(folder).free
    if free < need:
        raise InvalidRequestError(f"{folder} has {free >> 20} MiB free; this size needs about {need >> 20} MiB")
    say = progress or (lambda message: None)
    tmp = tempfile.mkdtemp(prefix=".vhdx-bench-", dir=folder)
    try:
        say(f"writing a {size >> 20} MiB chain in {tmp}")
        parent, child = os.path.join(tmp, "bench-base.vhdx"), os.path.join(tmp, "bench-1.avhdx")
        write_merge_chain(parent, child, size, size // 4, creator="vhdx-bench")
        flat_bytes, child_bytes = data_bytes_of(child)
        source = os.path.join(tmp, "copy-source.bin")
        with open(source, "wb") as f:
            payload = Payload(4)
            for offset in range(0, flat_bytes, CHUNK):
                f.write(payload.chunk(offset, min(CHUNK, flat_bytes - offset)))
        out = os.path.join(tmp, "out.raw")
        rows = []

        def flatten():
            with vhdx.open(child) as image:
                export_raw(image, out, overwrite=True)

        say("timing flatten against raw copy")
        rows += _pair("flatten chain to raw", flat_bytes, flatten, source, out, [parent, child, source], repeats)
        say("timing merge against raw copy")
        work = os.path.join(tmp, "merge")

        def merge_setup():
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work)
            for path in (parent, child):
                subprocess.run(["cp", "--sparse=always", "--reflink=never", path, work], check=True)
            drop_cache([os.path.join(work, os.path.basename(p)) for p in (parent, child)])

        rows += _pair("merge child into parent", child_bytes,
                      lambda: vhdx.merge_chain(os.path.join(work, os.path.basename(child))), source, out, [source], 1,
                      setup=merge_setup)
        return StorageBench(folder, filesystem_of(folder), size, repeats, tuple(rows))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pair(label: str, nbytes: int, ours, source: str, out: str, inputs, repeats: int, *, setup=None) -> list[Row]:
    """Our operation and the raw copy of the same byte count, interleaved; two rows."""

    def ours_setup():
        if setup:
            setup()
        drop_cache(inputs)

    methods = [Method(label, "ours", ours, setup=ours_setup, teardown=lambda: remove(out)),
               Method("raw copy_file_range, same bytes", "limit",
                      lambda: copy_file_range_all(source, out, nbytes), setup=lambda: drop_cache([source]),
                      teardown=lambda: remove(out))]
    ours_o, limit_o = run_methods(methods, repeats)
    rows = []
    for o in (ours_o, limit_o):
        med = o.median
        ratio = med / limit_o.median if med and limit_o.median and o is ours_o else None
        rows.append(Row(o.method, o.status, o.note, nbytes, med, o.min,
                        nbytes / med / MiB if med else None, ratio))
    return rows
