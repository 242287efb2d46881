"""Benchmark sizes: ``tiny`` for the smoke test, ``quick`` (about three to four minutes here) and ``full``."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


@dataclass(frozen=True)
class Profile:
    """Everything that scales with the chosen size.

    Attributes:
        name: profile name as given on the command line.
        repeats: timed runs per method (min and median are reported).
        dynamic_size: virtual size of the 25 %/75 % full dynamic disks and the 4K-sector disk.
        chain_size: virtual size of each differencing chain (its base is half full).
        chain_depths: the chain depths measured; the chains are built to the deepest and opened at each depth.
        random_writes: random 4 KiB writes per child layer (the "random" chains).
        sequential_writes: (count, length) of large sequential writes per child layer (the "sequential" chains).
        random_reads: 4 KiB reads per random-read run.
        sequential_read_bytes: bytes read in 1 MiB requests per sequential-read run.
        sparse_size: virtual size of the sparse disk (1 MiB blocks) for info and check.
        sparse_writes: 1 MiB blocks written across the sparse disk.
        create_size: virtual size for the create case (fixed and dynamic).
        merge_child_bytes: data written into the child of the dedicated merge chain (its parent: a quarter full).
        scan_disks: small disks in the fleet scanned by the scan case (chains of 5 in folders of 50).
    """

    name: str
    repeats: int
    dynamic_size: int
    chain_size: int
    chain_depths: tuple[int, ...]
    random_writes: int
    sequential_writes: tuple[int, int]
    random_reads: int
    sequential_read_bytes: int
    sparse_size: int
    sparse_writes: int
    create_size: int
    merge_child_bytes: int
    scan_disks: int = 0


TINY = Profile("tiny", repeats=1, dynamic_size=16 * MiB, chain_size=16 * MiB, chain_depths=(1, 2),
               random_writes=8, sequential_writes=(1, 2 * MiB), random_reads=16, sequential_read_bytes=4 * MiB,
               sparse_size=1 * GiB, sparse_writes=2, create_size=64 * MiB, merge_child_bytes=8 * MiB,
               scan_disks=100)
QUICK = Profile("quick", repeats=3, dynamic_size=256 * MiB, chain_size=128 * MiB, chain_depths=(1, 4, 16),
                random_writes=128, sequential_writes=(2, 4 * MiB), random_reads=200, sequential_read_bytes=64 * MiB,
                sparse_size=64 * TiB, sparse_writes=4, create_size=4 * GiB, merge_child_bytes=256 * MiB,
                scan_disks=300)
FULL = Profile("full", repeats=5, dynamic_size=8 * GiB, chain_size=8 * GiB, chain_depths=(1, 4, 16),
               random_writes=4096, sequential_writes=(4, 64 * MiB), random_reads=4096,
               sequential_read_bytes=2 * GiB, sparse_size=64 * TiB, sparse_writes=64, create_size=32 * GiB,
               merge_child_bytes=4 * GiB, scan_disks=10_000)

PROFILES = {p.name: p for p in (TINY, QUICK, FULL)}

# Rows that carry one of issue 15's targets take at least this many runs: on a shared 2-core machine the median of
# the quick profile's 3 moved across the bound from one run to the next (single runs 2-3x slower than the rest).
# The smoke profile (one run) keeps its one run.
TARGET_RUNS = 7


def target_runs(profile: Profile) -> int:
    """Runs for a target row under ``profile``."""
    return profile.repeats if profile.repeats <= 1 else max(profile.repeats, TARGET_RUNS)


def human_size(n: float) -> str:
    """1073741824 -> '1 GiB'; 1.5 MiB -> '1.5 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if float(n).is_integer() else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
