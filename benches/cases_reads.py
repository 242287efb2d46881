"""Chain reads through the supply index (issue 15 item 3) against libvhdi and the raw copy, with their targets.

Rows: random 4 KiB and sequential 1 MiB reads through the chains of scattered 4 KiB writes at depth 1, 4 and 16
against pyvhdi (libvhdi), and the flatten of the depth-16 chain against the raw ``copy_file_range`` of the same
bytes. Each record carries ``target``: the ratio measured in this run (median ours / median peer), the bound the
issue sets, and whether it is met. The timing itself is ``cases.reads`` / ``cases.flatten`` (same methods).
"""

from __future__ import annotations

from dataclasses import replace

from . import cases
from .sizes import Profile, target_runs
from .workloads import Workload

# (case, peer method, highest ratio of our time to the peer's) per issue 15's table.
TARGETS = {
    "random 4 KiB reads": ("pyvhdi", 1.0),
    "sequential 1 MiB reads": ("pyvhdi", 1.5),
    "flatten to raw": ("raw copy_file_range", 1.5),
}


def with_target(rec: dict) -> dict:
    """Add ``target`` = {"peer", "bound", "ratio", "met"} to a record of ``cases.reads``/``cases.flatten``."""
    peer, bound = TARGETS[rec["case"]]
    by_method = {o.method: o for o in rec["outcomes"]}
    ours, theirs = by_method.get("ours"), by_method.get(peer)
    ratio = None
    if ours is not None and theirs is not None and ours.median and theirs.median:
        ratio = round(ours.median / theirs.median, 3)
    rec = dict(rec, case=f"{rec['case']} (index)")
    rec["target"] = {"peer": peer, "bound": bound, "ratio": ratio, "met": None if ratio is None else ratio <= bound}
    return rec


def index_reads(chains: list[Workload], tmp: str, profile: Profile, limit_src: str) -> list[dict]:
    """The read rows of the fragmented (``rand4k``) chains at every depth, and the depth-16 flatten."""
    fragmented = [w for w in chains if w.name.startswith("rand4k")]
    profile = replace(profile, repeats=target_runs(profile))
    records = []
    for pattern in ("random", "sequential"):
        for w in fragmented:
            records.append(with_target(cases.reads(w, tmp, profile, pattern)))
    deepest = max(fragmented, key=lambda w: w.depth, default=None)
    if deepest is not None:
        records.append(with_target(cases.flatten(deepest, tmp, profile, limit_src)))
    return records


def summary(records: list[dict]) -> str:
    """One line per record: ratio against the bound."""
    lines = []
    for r in records:
        t = r.get("target") or {}
        ratio = "n/a" if t.get("ratio") is None else f"{t['ratio']:.2f}x"
        lines.append(f"{r['case']:<34} {r['workload']:<12} {ratio:>7} of {t.get('peer')} (target <= {t.get('bound')}x)"
                     f"{'' if t.get('met') is None else ' met' if t['met'] else ' NOT met'}")
    return "\n".join(lines)
