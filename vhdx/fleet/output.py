"""The scan's machine-readable forms: one JSON document, JSON Lines for big estates, and an SQLite database.

Schema ``vhdx-scan`` version 1 (every JSON Lines record carries ``schema``, ``version`` and ``record``):

- ``disk``: path, type (dynamic/fixed/differencing, null when unreadable), virtual_size, file_size, allocated
  (bytes the file system holds), block_size, logical_sector_size, physical_sector_size, creator, disk_id,
  data_write_guid, parent_linkage (list), parent_locator (first locator path), parent (resolved path, or the
  file the locator names), parent_status (none/ok/missing/mismatch/ambiguous/loop/parent_unreadable/unknown/outside),
  candidates, depth, tree, children, dirty_log, merge_interrupted (journal step or null), error, vanished,
  check (null, or exit_code/errors/warnings/leaked_bytes/problem), sha256.
- ``tree``: root, root_status, disks, depth, total_size, leaves, branches.
- ``vm_config``: path.
- ``summary`` (last line): the counts and lists of the ``summary`` key of the JSON document.

Records appear in path order, so two scans of the same files give the same lines whatever ran them.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator

from vhdx.errors import VhdxError
from vhdx.fleet.forest import PROBLEM_STATUSES, DiskNode
from vhdx.fleet.scan import ScanResult

SCHEMA = "vhdx-scan"
SCHEMA_VERSION = 1


def disk_record(node: DiskNode) -> dict:
    p = node.probe
    return {
        "path": p.path, "type": p.disk_type, "virtual_size": p.virtual_size, "file_size": p.file_size,
        "allocated": p.allocated, "block_size": p.block_size, "logical_sector_size": p.logical_sector_size,
        "physical_sector_size": p.physical_sector_size, "creator": p.creator, "disk_id": p.disk_id,
        "data_write_guid": p.data_write_guid, "parent_linkage": list(p.parent_linkages),
        "parent_locator": p.parent_hints[0][1] if p.parent_hints else None, "parent": node.parent,
        "parent_status": node.parent_status, "candidates": list(node.candidates), "depth": node.depth,
        "tree": node.tree, "children": len(node.children), "dirty_log": p.dirty_log,
        "merge_interrupted": node.merge_interrupted, "error": p.error, "vanished": p.vanished,
        "check": p.check.to_json() if p.check else None, "sha256": p.sha256,
    }


def tree_record(tree) -> dict:
    return {"root": tree.root, "root_status": tree.root_status, "disks": tree.disks, "depth": tree.depth,
            "total_size": tree.total_size, "leaves": tree.leaves, "branches": tree.branches}


def problem_count(result: ScanResult) -> int:
    """Problems that need attention (exit 2); leaked space alone (from --check) is not one of them."""
    s = summary(result)
    return (sum(s["problems"].values()) - s["problems"]["check_leaks"] + len(result.walk.unreadable_dirs))


def exit_code(result: ScanResult) -> int:
    """0 nothing found, 2 problems found, 3 only leaked space (as ``check`` and ``qemu-img check``)."""
    if problem_count(result):
        return 2
    return 3 if summary(result)["problems"]["check_leaks"] else 0


def summary(result: ScanResult) -> dict:
    f, w = result.forest, result.walk
    paths = lambda nodes: [n.probe.path for n in nodes]  # noqa: E731
    by_status = {s: f.with_status(s) for s in PROBLEM_STATUSES}
    leaks = [n for n in f.nodes.values() if n.probe.check is not None and n.probe.check.exit_code == 3]
    bad_journals = [j for j in f.journals if j.error]
    return {
        "disks": len(f.nodes),
        "differencing": sum(n.probe.has_parent for n in f.nodes.values()),
        "trees": len(f.trees),
        "vm_configs": len(w.vm_configs),
        "other_files": w.other_files,
        "problems": {
            **{s: len(nodes) for s, nodes in by_status.items()},
            "unreadable": len(f.unreadable), "dirty": len(f.dirty), "merge_interrupted": len(f.journals),
            "check_failed": len(f.check_failed), "check_leaks": len(leaks),
        },
        "orphans": paths(by_status["missing"]),
        "orphan_bytes": f.space_under(by_status["missing"]),
        "broken": paths(by_status["mismatch"]),
        "ambiguous": paths(by_status["ambiguous"]),
        "loops": paths(by_status["loop"]),
        "parent_unreadable": paths(by_status["parent_unreadable"]),
        "parent_outside_roots": paths(f.with_status("outside")),
        "dirty": paths(f.dirty),
        "unreadable": [{"path": n.probe.path, "error": n.probe.error, "vanished": n.probe.vanished}
                       for n in f.unreadable],
        "interrupted_merges": [{"journal": j.path, "child": j.child, "destination": j.destination,
                                "state": j.state, "error": j.error} for j in f.journals],
        "unreadable_journals": [j.path for j in bad_journals],
        "check_failed": paths(f.check_failed),
        "deepest": [{"path": n.probe.path, "depth": n.depth, "tree": n.tree} for n in f.deepest()],
        "failed_tasks": result.failed_tasks,
        "retried_tasks": result.retried_tasks,
    }


def document(result: ScanResult) -> dict:
    """The whole scan as one JSON document (``--json``)."""
    w = result.walk
    return {
        "schema": SCHEMA, "version": SCHEMA_VERSION, "roots": result.roots,
        "disks": [disk_record(n) for n in result.forest.nodes.values()],
        "trees": [tree_record(t) for t in result.forest.trees],
        "vm_configs": {"count": len(w.vm_configs), "paths": sorted(w.vm_configs)},
        "skipped": {"other_files": w.other_files, "special_files": sorted(w.special_files),
                    "links": sorted(w.skipped_links),
                    "unreadable_dirs": [{"path": p, "error": e} for p, e in w.unreadable_dirs]},
        "summary": summary(result),
        "timing": timing(result),
    }


def timing(result: ScanResult) -> dict:
    n = len(result.forest.nodes)
    return {"seconds": round(result.seconds, 3), "disks_per_second": round(n / result.seconds, 1)
            if result.seconds > 0 else None}


def jsonl_records(result: ScanResult) -> Iterator[dict]:
    """``--jsonl``: one record per disk, tree and VM configuration file, then the summary."""
    head = {"schema": SCHEMA, "version": SCHEMA_VERSION}
    for node in result.forest.nodes.values():
        yield {**head, "record": "disk", **disk_record(node)}
    for tree in result.forest.trees:
        yield {**head, "record": "tree", **tree_record(tree)}
    for path in sorted(result.walk.vm_configs):
        yield {**head, "record": "vm_config", "path": path}
    yield {**head, "record": "summary", "roots": result.roots, **summary(result), **timing(result)}


def write_jsonl(result: ScanResult, stream) -> None:
    for record in jsonl_records(result):
        stream.write(json.dumps(record, sort_keys=False) + "\n")


_DISK_COLUMNS = ("path", "type", "virtual_size", "file_size", "allocated", "block_size", "creator", "disk_id",
                 "data_write_guid", "parent_locator", "parent", "parent_status", "depth", "tree", "children",
                 "dirty_log", "merge_interrupted", "error", "check_exit_code", "sha256")


def write_sqlite(result: ScanResult, path: str) -> None:
    """``--sqlite DB``: tables disks, trees, vm_configs and meta (schema, version, summary as JSON).

    Built as ``DB.part`` and renamed over DB at the end: a crash leaves the previous database whole.
    """
    tmp = path + ".part"
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        db = sqlite3.connect(tmp)
        try:
            db.execute(f"CREATE TABLE disks ({', '.join(_DISK_COLUMNS)}, PRIMARY KEY (path))")
            db.execute("CREATE TABLE trees (root PRIMARY KEY, root_status, disks, depth, total_size, leaves, "
                       "branches)")
            db.execute("CREATE TABLE vm_configs (path PRIMARY KEY)")
            db.execute("CREATE TABLE meta (key PRIMARY KEY, value)")
            rows = []
            for node in result.forest.nodes.values():
                rec = disk_record(node)
                rec["check_exit_code"] = rec["check"]["exit_code"] if rec["check"] else None
                rows.append(tuple(rec[col] for col in _DISK_COLUMNS))
            db.executemany(f"INSERT INTO disks VALUES ({', '.join('?' * len(_DISK_COLUMNS))})", rows)
            db.executemany("INSERT INTO trees VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [tuple(tree_record(t).values()) for t in result.forest.trees])
            db.executemany("INSERT INTO vm_configs VALUES (?)", [(p,) for p in sorted(result.walk.vm_configs)])
            db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("schema", SCHEMA), ("version", SCHEMA_VERSION), ("roots", json.dumps(result.roots)),
                ("summary", json.dumps(summary(result)))])
            db.commit()
        finally:
            db.close()
        os.replace(tmp, path)
    except (OSError, sqlite3.Error) as exc:
        raise VhdxError(f"cannot write the scan database: {exc}", path=path) from None
