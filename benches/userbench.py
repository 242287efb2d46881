"""``vhdx bench``: merge and flatten throughput on the user's own storage, against its raw copy bandwidth.

No peers are needed: the yardstick is ``os.copy_file_range`` of the same number of bytes in the same folder.
Runs are cold-cache for the inputs: every input file is fsynced and dropped from the page cache with
``posix_fadvise(DONTNEED)`` before each timed run, so reads come from the storage, as in a real merge.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass

import vhdx
from vhdx.errors import InvalidRequestError
from vhdx.ops.export import export_raw

from .measure import Method, copy_file_range_all, remove, run_methods
from .report import filesystem_of
from .sizes import MiB
from .workloads import CHUNK, Payload, merge_chain

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


def _merge_function():
    fn = getattr(vhdx, "merge", None)
    if fn is not None and not callable(fn):
        fn = getattr(fn, "merge", None)
    return fn if callable(fn) else None


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
        chain = merge_chain(tmp, size, size // 4, name="bench", creator="vhdx-bench")
        parent, child = chain.layers
        flat_bytes, child_bytes = chain.data_bytes, chain.top_data_bytes
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
        merge = _merge_function()
        say("timing merge against raw copy" if merge else "merge: vhdx.ops.merge is not built yet")
        work = os.path.join(tmp, "merge")

        def merge_setup():
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work)
            for path in (parent, child):
                subprocess.run(["cp", "--sparse=always", "--reflink=never", path, work], check=True)
            drop_cache([os.path.join(work, os.path.basename(p)) for p in (parent, child)])

        rows += _pair("merge child into parent", child_bytes,
                      (lambda: merge(os.path.join(work, os.path.basename(child)))) if merge else None, source, out,
                      [source], 1, setup=merge_setup, missing=None if merge else "missing: vhdx.ops.merge")
        return StorageBench(folder, filesystem_of(folder), size, repeats, tuple(rows))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pair(label: str, nbytes: int, ours, source: str, out: str, inputs, repeats: int, *, setup=None,
          missing=None) -> list[Row]:
    """Our operation and the raw copy of the same byte count, interleaved; two rows."""

    def ours_setup():
        if setup:
            setup()
        drop_cache(inputs)

    methods = [Method(label, "ours", ours, setup=ours_setup, teardown=lambda: remove(out), missing=missing),
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
