"""``vhdx scan``: inventory and health of many disks, locally in parallel or on a Dask cluster."""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack

import click

from vhdx.fleet import executor as fleet_executor
from vhdx.fleet import output
from vhdx.fleet.forest import Forest
from vhdx.fleet.probe import ProbeOptions
from vhdx.fleet.scan import ScanResult
from vhdx.fleet.scan import scan as run_scan
from vhdx_cli import render
from vhdx_cli.common import handle_errors, json_wanted
from vhdx_cli.options import json_option
from vhdx_cli.text import printable

TREE_LINES = 200  # problem tree view: lines shown before "... and N more"
LABELS = {"missing": "orphans (parent missing)", "mismatch": "broken linkage (parent changed after the child)",
          "ambiguous": "ambiguous parent", "loop": "parent loop", "parent_unreadable": "parent unreadable",
          "unreadable": "unreadable disks", "dirty": "dirty log", "merge_interrupted": "interrupted merges",
          "check_failed": "check found corruption", "check_leaks": "check found only leaked space"}


class ScanProgress:
    """Disks probed, disks/s and ETA on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self._last = 0.0

    def __call__(self, done: int, found: int, walked: bool) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.2:
            return
        self._last = now
        rate = done / max(now - self.start, 1e-6)
        eta = f"ETA {(found - done) / rate:,.0f}s" if walked and rate else "walking"
        click.echo(f"\rscan: {done:,}/{found:,} disks {rate:,.0f} disks/s {eta} ", err=True, nl=False)

    def finish(self, disks: int) -> None:
        if self.enabled:
            seconds = time.monotonic() - self.start
            click.echo(f"\rscan: {disks:,} disks in {seconds:,.1f} s ({disks / max(seconds, 1e-6):,.0f} disks/s)"
                       + " " * 20, err=True)


PARENT_MARKS = {"missing": "orphan: parent {parent} not found", "mismatch": "broken: {parent} changed after this "
                "disk was made", "ambiguous": "ambiguous parent", "loop": "parent loop",
                "parent_unreadable": "parent {parent} unreadable"}
LIST_SHOWN = 20  # VM configuration files listed in the text summary


def _problem_marks(forest: Forest) -> dict[str, str]:
    marks = {}
    for path, node in forest.nodes.items():
        mark = PARENT_MARKS.get(node.parent_status)
        found = [mark.format(parent=node.parent)] if mark else []
        found += ["dirty log"] if node.probe.dirty_log else []
        found += [f"merge interrupted ({node.merge_interrupted})"] if node.merge_interrupted else []
        if node.probe.check is not None and node.probe.check.exit_code not in (0,):
            found.append(f"check {node.probe.check.exit_code}: {', '.join(node.probe.check.errors) or 'leaks'}")
        if found:
            marks[path] = ", ".join(found)
    return marks


def tree_view(forest: Forest) -> list[str]:
    """Each tree that holds a problem, showing only the branches that lead to one."""
    marks = _problem_marks(forest)
    wanted = set()
    for path in marks:
        node = forest.nodes[path]
        while node is not None and node.probe.path not in wanted:
            wanted.add(node.probe.path)
            node = forest.nodes[node.parent] if node.parent_status == "ok" else None
    lines = []
    for tree in forest.trees:
        if tree.root not in wanted:
            continue
        stack = [(tree.root, 0)]
        while stack:
            path, level = stack.pop()
            node = forest.nodes[path]
            mark = f"  [{marks[path]}]" if path in marks else ""
            size = render.human_size(node.probe.file_size)
            lines.append(f"  {'  ' * level}{'└─ ' if level else ''}{path} ({node.probe.disk_type}, {size}){mark}")
            stack.extend((child, level + 1) for child in reversed(node.children) if child in wanted)
    return lines


def summary_text(result: ScanResult) -> str:
    s, t = output.summary(result), output.timing(result)
    lines = [f"scanned {s['disks']} disks ({s['differencing']} differencing) in {s['trees']} trees, "
             f"{s['vm_configs']} VM configuration files, {s['other_files']} other files skipped; "
             f"{t['seconds']:.1f} s ({t['disks_per_second'] or 0:,.0f} disks/s)"]
    problems = {k: v for k, v in s["problems"].items() if v}
    if not problems and not result.walk.unreadable_dirs:
        lines.append("no problems found")
    for key, count in problems.items():
        extra = f", holding {render.human_size(s['orphan_bytes'])}" if key == "missing" else ""
        lines.append(f"  {LABELS[key]}: {count}{extra}")
    if s["parent_outside_roots"]:
        lines.append(f"  note: {len(s['parent_outside_roots'])} disks have their parent outside the roots "
                     "(not verified; scan its folder too)")
    if s["retried_tasks"] or s["failed_tasks"]:
        lines.append(f"  probe tasks rerun after a worker died: {s['retried_tasks']}; tasks that failed (their disks "
                     f"are listed as unreadable): {s['failed_tasks']}")
    for path, reason in result.walk.unreadable_dirs:
        lines.append(f"  unreadable folder: {path} ({reason})")
    view = tree_view(result.forest)
    if view:
        lines.append("problem trees:")
        lines.extend(view[:TREE_LINES])
        if len(view) > TREE_LINES:
            lines.append(f"  ... and {len(view) - TREE_LINES} more lines (see --json)")
    for item in s["unreadable"]:
        lines.append(f"  unreadable: {item['path']}: {item['error']}")
    for item in s["interrupted_merges"]:
        what = item["error"] or f"merge of {item['child']} into {item['destination']} stopped at '{item['state']}'"
        lines.append(f"  merge journal {item['journal']}: {what}")
    if s["deepest"]:
        lines.append("deepest chains: " + ", ".join(f"{d['path']} ({d['depth']})" for d in s["deepest"]))
    if result.walk.vm_configs:
        configs = sorted(result.walk.vm_configs)
        lines.append(f"VM configuration files ({len(configs)}):")
        lines.extend(f"  {p}" for p in configs[:LIST_SHOWN])
        if len(configs) > LIST_SHOWN:
            lines.append(f"  ... and {len(configs) - LIST_SHOWN} more (see --json)")
    return "\n".join(printable(line) for line in lines)


@click.command()
@click.argument("roots", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--jsonl", "jsonl", type=click.Path(dir_okay=False, allow_dash=True),
              help="Stream one JSON record per disk (then trees and a summary) to this file ('-': stdout).")
@click.option("--sqlite", "sqlite_db", type=click.Path(dir_okay=False), help="Also write the results to this "
              "SQLite database (tables disks, trees, vm_configs, meta).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Local worker processes (default: the cores).")
@click.option("--scheduler", help="Run the probes on this Dask cluster (tcp://HOST:PORT; needs the [fleet] extra).")
@click.option("--scheduler-timeout", type=click.FloatRange(min=0.1), default=fleet_executor.CONNECT_TIMEOUT,
              show_default=True, help="Seconds to wait for the Dask scheduler to answer.")
@click.option("--local-cluster", is_flag=True, help="Start a Dask cluster on 127.0.0.1 with --jobs workers.")
@click.option("--check", "full_check", is_flag=True, help="Also run the full check of each disk (reads its BAT).")
@click.option("--hash", "with_hash", is_flag=True, help="Also hash each file's bytes (SHA-256).")
@click.option("--follow-symlinks", is_flag=True, help="Follow symbolic links that lead out of the roots.")
@click.option("--progress/--no-progress", default=None, help="Disks/s and ETA on stderr (default: on a terminal).")
@json_option
@handle_errors
def scan(roots, jsonl, sqlite_db, jobs, scheduler, scheduler_timeout, local_cluster, full_check,
         with_hash, follow_symlinks, progress):
    """Find every VHDX/AVHDX under ROOTS, probe its headers, and report chains, trees and their problems.

    Exit 0 when nothing is wrong, 2 when a problem is found (orphan, broken or ambiguous linkage, dirty log,
    interrupted merge, unreadable disk, check errors), 3 when --check finds only leaked space, 1 if it cannot run.
    """
    if scheduler and local_cluster:
        raise click.UsageError("--scheduler and --local-cluster exclude each other")
    if json_wanted() and jsonl == "-":
        raise click.UsageError("--json and --jsonl - both write to stdout; give --jsonl a file")
    shown = ScanProgress(progress)
    with ExitStack() as stack:
        if local_cluster:
            scheduler = stack.enter_context(fleet_executor.local_cluster(jobs))
        executor = stack.enter_context(fleet_executor.dask_executor(scheduler, timeout=scheduler_timeout) if scheduler
                                        else fleet_executor.local_executor(jobs))
        result = run_scan(roots, executor, options=ProbeOptions(check=full_check, hash=with_hash),
                          follow_symlinks=follow_symlinks, progress=shown)
    shown.finish(len(result.forest.nodes))
    if sqlite_db:
        output.write_sqlite(result, sqlite_db)
    if jsonl:
        with click.open_file(jsonl, "w", encoding="utf-8", atomic=jsonl != "-") as stream:
            output.write_jsonl(result, stream)
    if json_wanted():
        render.emit_json(output.document(result))
    elif jsonl != "-":  # --jsonl -: stdout holds the records alone
        render.echo_text(summary_text(result))
    raise SystemExit(output.exit_code(result))
