"""``python -m benches --quick|--full [--out DIR]``: build the workloads, run every case, write the results.

Writes ``results.json``, ``results.md`` and ``charts/*.png`` into ``--out`` (default ``bench-results/``).
Workload files live in a temporary folder under ``--out`` (or ``--tmp``) that is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace

from . import (
    cases,
    cases_export,
    cases_merge,
    cases_reads,
    cases_scale,
    cases_startup,
    measure,
    page_reporting,
    report,
)
from .sizes import PROFILES
from .workloads import build_all

CASES = ("flatten", "reads", "merge", "info", "create", "scan", "export", "reads_index", "scale", "startup",
         "merge_cost")
NEEDS = {"flatten": ("dynamic", "sector4k", "chains"), "reads": ("chains",), "merge": ("chains", "merge"),
         "info": ("sparse",), "create": (), "scan": (), "export": (), "reads_index": ("chains",), "scale": (),
         "startup": (), "merge_cost": ()}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benches", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="profile", action="store_const", const="quick", help="about 3-4 minutes")
    size.add_argument("--full", dest="profile", action="store_const", const="full",
                      help="8-32 GiB virtual disks, several GiB written")
    size.add_argument("--profile", dest="profile", choices=sorted(PROFILES), help="profile by name (tiny: smoke)")
    parser.add_argument("--out", default="bench-results", help="folder for results (default: bench-results)")
    parser.add_argument("--tmp", help="folder for the workload files (default: a temporary folder under --out)")
    parser.add_argument("--repeats", type=int, help="timed runs per method (default from the profile)")
    parser.add_argument("--only", action="append", choices=CASES, help="run only these cases (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the workload files")
    parser.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    parser.add_argument("--pause-page-reporting", action="store_true",
                        help="in a virtual machine: stop handing freed memory back to the host during the run "
                             "(root; put back at the end; see benches/page_reporting.py)")
    args = parser.parse_args(argv)
    args.profile = args.profile or "quick"
    return args


def log(message: str, started: float) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)


def run(argv=None) -> dict:
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    if args.repeats:
        profile = replace(profile, repeats=args.repeats)
    only = set(args.only or CASES)
    os.makedirs(args.out, exist_ok=True)
    if args.tmp:
        os.makedirs(args.tmp, exist_ok=True)
    # Absolute: our processes start in the install's folder (measure.Install.cwd), paths given to them must hold.
    tmp = os.path.abspath(tempfile.mkdtemp(prefix="vhdx-bench-", dir=args.tmp or args.out))
    started = time.monotonic()
    records = []
    try:
        with measure.bytecode_cache(os.path.join(tmp, "pycache")), \
                measure.installed_copy(tmp) as install, \
                page_reporting.paused(args.pause_page_reporting) as reporting:  # each command finds its .pyc
            log(f"ours: {install.how}", started)
            speed = {"start": report.speed()}
            measure.compile_sources("vhdx", "vhdx_cli", "numpy", "click", "construct", "crc32c")
            log(f"building {profile.name} workloads in {tmp}", started)
            work = build_all(tmp, profile, families={f for case in only for f in NEEDS[case]})
            build_seconds = time.monotonic() - started
            chains = work["chains"]
            flat_inputs = work["dynamic"] + work["sector4k"] + chains
            limit_src = os.path.join(tmp, "limit-source.bin")
            cases.make_limit_source(limit_src, max([w.data_bytes for w in flat_inputs + work["merge"]], default=0))
            records += run_chain_cases(only, work, tmp, profile, limit_src, started)
            records += run_other_cases(only, work, tmp, profile, limit_src, started)
            speed["end"] = report.speed()
        # (after the with: the memory reported to the host is counted when the run ends)
        results = {"profile": profile.name, "repeats": profile.repeats, "machine": report.machine(tmp),
                   "speed": speed, "install": install.how, "command": report.python_cmd(),
                   "page_reporting": reporting.describe(), "build_seconds": round(build_seconds, 2),
                   "records": records}
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    results["total_seconds"] = round(time.monotonic() - started, 2)
    report.write_json(results, os.path.join(args.out, "results.json"))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report.markdown(results))
    pngs, note = ([], "charts skipped (--no-charts)") if args.no_charts else report.charts(
        results, os.path.join(args.out, "charts"))
    results["charts"], results["charts_note"] = pngs, note
    log(f"done: {args.out}/results.json, results.md, {len(pngs)} charts" + (f" ({note})" if note else ""), started)
    return results


def run_chain_cases(only: set, work: dict, tmp: str, profile, limit_src: str, started: float) -> list:
    """The flatten, reads, merge and merge_cost records, in that order."""
    records = []
    chains = work["chains"]
    if "flatten" in only:
        for w in work["dynamic"] + work["sector4k"] + chains:
            log(f"flatten {w.name}", started)
            records.append(cases.flatten(w, tmp, profile, limit_src))
    if "reads" in only:
        for pattern in ("random", "sequential"):
            for w in chains:
                log(f"{pattern} reads {w.name}", started)
                records.append(cases.reads(w, tmp, profile, pattern))
    if "merge" in only:
        for w in [w for w in chains if w.depth == 1] + work["merge"]:
            log(f"merge {w.name}", started)
            records.append(cases.merge(w, tmp, profile, limit_src))
    if "merge_cost" in only:
        records += cases_merge.merge_cost(tmp, profile, limit_src)
    return records


def run_other_cases(only: set, work: dict, tmp: str, profile, limit_src: str, started: float) -> list:
    """The info, create, reads_index, scan, export, scale and start-up records, in that order."""
    records = []
    chains = work["chains"]
    if "info" in only:
        log("info/check sparse", started)
        records += cases.info_check(work["sparse"][0], tmp, profile)
    if "create" in only:
        for disk_type in ("fixed", "dynamic"):
            log(f"create {disk_type}", started)
            records.append(cases.create_case(tmp, profile, disk_type))
    if "reads_index" in only:
        log("chain reads through the supply index, with targets", started)
        index_records = cases_reads.index_reads(chains, tmp, profile, limit_src)
        records += index_records
        log("targets:\n" + cases_reads.summary(index_records), started)
    if "scan" in only:
        log(f"scan {profile.scan_disks} disks", started)
        records += cases.scan_case(tmp, profile)
    if "export" in only:
        log("convert -O raw of zero-filled blocks", started)
        records.append(cases_export.export_case(tmp, profile))
    if "scale" in only:
        log("64 TiB: create, info, chain, map", started)
        records += cases_scale.scale_cases(tmp, profile)
    if "startup" in only:
        log("start-up", started)
        records += cases_startup.startup_case(tmp, profile)
    return records


def main(argv=None) -> int:
    run(argv)
    return 0
