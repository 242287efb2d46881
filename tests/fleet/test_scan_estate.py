"""Scanning an estate of a few hundred disks finds exactly the problems built into it, however it runs."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
from click.testing import CliRunner

from vhdx.fleet import output
from vhdx.fleet.executor import dask_executor, local_executor
from vhdx.fleet.scan import scan
from vhdx_cli.main import cli


def comparable(result) -> dict:
    """The document without what legitimately changes between two scans of the same files: timings, and the
    blocks the file system allocates (ext4 settles delayed allocations at writeback, after the estate is built).
    """
    doc = output.document(result)
    doc.pop("timing")
    for disk in doc["disks"]:
        disk.pop("allocated")
    return doc


def expect_estate_findings(estate, doc: dict) -> None:
    s = doc["summary"]
    assert sorted(d["path"] for d in doc["disks"]) == estate.disks
    assert s["orphans"] == estate.orphans
    assert s["broken"] == estate.broken
    assert s["dirty"] == estate.dirty
    assert sorted(p for m in s["interrupted_merges"] for p in (m["child"], m["destination"])) == \
        sorted(estate.interrupted)
    assert s["ambiguous"] == s["loops"] == s["unreadable"] == []
    assert doc["vm_configs"] == {"count": len(estate.vm_configs), "paths": sorted(estate.vm_configs)}
    assert doc["skipped"]["other_files"] == estate.other_files
    assert len(doc["trees"]) == estate.trees
    assert s["deepest"][0]["depth"] == estate.deepest
    by_path = {d["path"]: d for d in doc["disks"]}
    assert {by_path[p]["parent_status"] for p in estate.orphans} == {"missing"}
    assert {by_path[p]["parent_status"] for p in estate.broken} == {"mismatch"}
    healthy = set(estate.disks) - set(estate.orphans) - set(estate.broken)
    assert {by_path[p]["parent_status"] for p in healthy} == {"none", "ok"}


@pytest.fixture(scope="module")
def inline_result(estate):
    with local_executor(1) as executor:
        return scan([estate.root], executor)


def test_jobs_1_finds_exactly_the_built_problems(estate, inline_result):
    expect_estate_findings(estate, comparable(inline_result))


def test_orphan_space_is_the_orphan_subtree(estate, inline_result):
    doc = comparable(inline_result)
    sizes = {d["path"]: d["file_size"] for d in doc["disks"]}
    assert doc["summary"]["orphan_bytes"] == sum(sizes[p] for p in estate.orphans)  # cp3 is vm001's last layer


def test_jobs_2_gives_the_same_results(estate, inline_result):
    with local_executor(2) as executor:
        result = scan([estate.root], executor, batch_files=16)
    assert comparable(result) == comparable(inline_result)


def test_dask_cluster_gives_the_same_results(estate, inline_result, dask_address):
    with dask_executor(dask_address) as executor:
        result = scan([estate.root], executor, batch_files=16)
    assert comparable(result) == comparable(inline_result)


def test_cli_json_document_has_disks_and_summary_lists(estate):
    run = CliRunner().invoke(cli, ["scan", "--jobs", "1", "--json", estate.root])
    assert run.exit_code == 2, run.output
    doc = json.loads(run.output)
    expect_estate_findings(estate, doc)
    assert {"path", "type", "virtual_size", "file_size", "allocated", "parent_status", "dirty_log"} <= \
        set(doc["disks"][0])


def test_cli_jsonl_streams_one_versioned_record_per_disk_then_the_summary(estate, tmp_path):
    out = tmp_path / "scan.jsonl"
    run = CliRunner().invoke(cli, ["scan", "--jobs", "1", "--jsonl", str(out), estate.root])
    assert run.exit_code == 2, run.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["schema"], r["version"]) for r in records} == {(output.SCHEMA, output.SCHEMA_VERSION)}
    assert sorted(r["path"] for r in records if r["record"] == "disk") == estate.disks
    assert records[-1]["record"] == "summary" and records[-1]["orphans"] == estate.orphans


def test_cli_sqlite_database_answers_queries(estate, tmp_path):
    db = tmp_path / "scan.db"
    run = CliRunner().invoke(cli, ["scan", "--jobs", "1", "--sqlite", str(db), estate.root])
    assert run.exit_code == 2, run.output
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT path FROM disks WHERE parent_status = 'missing'").fetchall()
        assert [r[0] for r in rows] == estate.orphans
        assert conn.execute("SELECT COUNT(*) FROM disks").fetchone()[0] == len(estate.disks)
        assert conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0] == output.SCHEMA_VERSION


def test_cli_text_summary_shows_the_problem_trees(estate):
    run = CliRunner().invoke(cli, ["scan", "--jobs", "1", estate.root])
    assert run.exit_code == 2
    assert "orphans (parent missing): 1" in run.output and "broken linkage" in run.output
    assert f"{estate.orphans[0]} (differencing, 4 MiB)  [orphan: parent .\\cp2.avhdx not found]" in run.output
    assert f"[broken: {estate.root}/vm002/base.vhdx changed after this disk was made]" in run.output
    assert f"VM configuration files ({len(estate.vm_configs)}):" in run.output and "... and 20 more" in run.output
    assert "[dirty log]" in run.output


def test_clean_folder_exits_0(estate):
    run = CliRunner().invoke(cli, ["scan", "--jobs", "1", f"{estate.root}/vm010"])
    assert run.exit_code == 0, run.output
    assert "no problems found" in run.output


def test_unreachable_scheduler_is_one_line_exit_1(estate):
    pytest.importorskip("distributed")
    run = CliRunner().invoke(cli, ["scan", "--scheduler", "tcp://127.0.0.1:9", "--scheduler-timeout", "1",
                                   f"{estate.root}/vm010"])
    assert run.exit_code == 1
    assert run.output.startswith("vhdx: error: cannot reach the Dask scheduler") and run.output.count("\n") == 1


def test_cli_check_and_hash_report_per_disk(estate):
    folder = f"{estate.root}/vm003"  # holds the dirty disk
    run = CliRunner().invoke(cli, ["scan", "--jobs", "1", "--check", "--hash", "--json", folder])
    assert run.exit_code == 2, run.output
    doc = json.loads(run.output)
    checks = {d["path"]: d["check"] for d in doc["disks"]}
    assert doc["summary"]["check_failed"] == estate.dirty
    assert "LOG_DIRTY" in checks[estate.dirty[0]]["errors"]
    assert {c["exit_code"] for p, c in checks.items() if p not in estate.dirty} == {0}
    assert all(len(d["sha256"]) == 64 for d in doc["disks"])


def test_cli_local_cluster_scans_on_loopback(estate):
    pytest.importorskip("distributed")
    run = CliRunner().invoke(cli, ["scan", "--local-cluster", "--jobs", "1", "--json", f"{estate.root}/vm001"])
    assert run.exit_code == 2, run.output
    assert json.loads(run.output)["summary"]["orphans"] == estate.orphans


def test_cli_progress_shows_disks_per_second(estate):
    run = CliRunner().invoke(cli, ["scan", "--jobs", "1", "--progress", f"{estate.root}/vm010"])
    assert run.exit_code == 0
    assert "disks/s" in run.stderr


def test_scheduler_and_local_cluster_exclude_each_other(estate):
    run = CliRunner().invoke(cli, ["scan", "--local-cluster", "--scheduler", "tcp://127.0.0.1:1", estate.root])
    assert run.exit_code == 1 and "exclude each other" in run.output


def test_parent_outside_the_roots_is_noted_not_an_orphan(tmp_path):
    from vhdx_fixtures.fleet import write_disk

    (tmp_path / "templates").mkdir()
    (tmp_path / "vm").mkdir()
    base, child = str(tmp_path / "templates" / "base.vhdx"), str(tmp_path / "vm" / "child.avhdx")
    write_disk(base)
    write_disk(child, base)
    run = CliRunner().invoke(cli, ["scan", "--jobs", "1", "--json", str(tmp_path / "vm")])
    assert run.exit_code == 0, run.output
    doc = json.loads(run.output)
    assert doc["disks"][0]["parent_status"] == "outside" and doc["disks"][0]["parent"] == base
    assert doc["summary"]["orphans"] == [] and doc["summary"]["parent_outside_roots"] == [child]
    text = CliRunner().invoke(cli, ["scan", "--jobs", "1", str(tmp_path / "vm")]).output
    assert "1 disks have their parent outside the roots" in text


def test_text_escapes_control_characters_from_hostile_locators(tmp_path):
    from vhdx_fixtures.fleet import write_disk

    parent = str(tmp_path / "base\x1b[2J.vhdx")
    write_disk(parent)
    write_disk(str(tmp_path / "child.avhdx"), parent)
    os.unlink(parent)
    run = CliRunner().invoke(cli, ["scan", "--jobs", "1", str(tmp_path)])
    assert run.exit_code == 2
    assert "\x1b" not in run.output and "base\\x1b[2J.vhdx" in run.output
