"""Compaction speed: a dynamic disk with every other block all zeros, compacted in place, next to copying the data
it keeps with ``copy_file_range`` (the floor for any tool that must move that data).

Run: ``python -m benches.compact_bench [--dir FOLDER] [--size 4G]``; prints one JSON object. Both sides fsync
their result, and each starts with a cold page cache when the process may drop it (root), else warm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from vhdx.disk.image import open_image
from vhdx.ops.compact import compact_image
from vhdx.ops.create import create

MiB = 1 << 20
BLOCK = 32 * MiB


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def build(path: str, size: int) -> int:
    """Every even block holds data, every odd block is allocated and all zeros; returns the data bytes."""
    create(path, size, block_size=BLOCK)
    data = bytes(range(256)) * (BLOCK // 256)
    zeros = bytes(BLOCK)
    kept = 0
    with open_image(path, writable=True) as disk:
        for i in range(size // BLOCK):
            disk.write(i * BLOCK, data if i % 2 == 0 else zeros)
            kept += BLOCK if i % 2 == 0 else 0
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return kept


def copy_data(src: str, dst: str, length: int) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        done = 0
        while done < length:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), length - done, done, done)
            if n == 0:
                break
            done += n
        os.fsync(fout.fileno())


def run(folder: str, size: int) -> dict:
    work = tempfile.mkdtemp(prefix="compact-bench-", dir=folder)
    try:
        disk = os.path.join(work, "disk.vhdx")
        kept = build(disk, size)
        raw_src = os.path.join(work, "data.bin")
        with open(raw_src, "wb") as f:  # a plain file of the kept bytes, as the copy baseline's source
            chunk = bytes(range(256)) * (BLOCK // 256)
            for _ in range(kept // BLOCK):
                f.write(chunk)
            os.fsync(f.fileno())
        cold = drop_caches()
        t0 = time.perf_counter()
        copy_data(raw_src, os.path.join(work, "copy.bin"), kept)
        copy_seconds = time.perf_counter() - t0
        before = os.path.getsize(disk)
        drop_caches()
        t0 = time.perf_counter()
        result = compact_image(disk)
        compact_seconds = time.perf_counter() - t0
        return {"virtual_size": size, "block_size": BLOCK, "kept_bytes": kept, "file_before": before,
                "file_after": result.file_size_after, "zero_blocks_released": result.zero_blocks_released,
                "blocks_moved": result.blocks_moved, "compact_seconds": round(compact_seconds, 3),
                "copy_file_range_seconds": round(copy_seconds, 3),
                "ratio": round(compact_seconds / copy_seconds, 2), "cold_cache": cold}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=".")
    parser.add_argument("--size", type=int, default=4 << 30)
    args = parser.parse_args()
    print(json.dumps(run(os.path.abspath(args.dir), args.size), indent=2))


if __name__ == "__main__":
    main()
