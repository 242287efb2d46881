"""The benchmark harness runs end to end on tiny disks (keeps ``python -m benches`` from rotting).

Only that it runs and that its outputs hold what they claim is tested here; timings belong in benches/.
"""

from __future__ import annotations

import json

import pytest

from benches import run as bench_run
from benches.report import primary
from vhdx_cli.bench_cmds import bench_text


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    bench_run.run(["--profile", "tiny", "--out", str(out), "--only", "flatten", "--only", "reads",
                   "--only", "merge", "--no-charts"])
    return out


def test_benches_writes_json_and_markdown(tiny_results):
    data = json.loads((tiny_results / "results.json").read_text())
    assert data["profile"] == "tiny"
    assert {r["case"] for r in data["records"]} >= {"flatten to raw", "random 4 KiB reads", "sequential 1 MiB reads",
                                                    "merge child into parent"}
    assert "### flatten to raw" in (tiny_results / "results.md").read_text()


def test_benches_ours_runs_in_every_flatten_and_read_case(tiny_results):
    data = json.loads((tiny_results / "results.json").read_text())
    for r in data["records"]:
        if r["case"] != "merge child into parent":
            ours = primary(r["outcomes"])
            assert ours is not None and len(ours["times_s"]) == data["repeats"], r["workload"]


def test_benches_peers_that_ran_read_the_same_bytes_as_ours(tiny_results):
    data = json.loads((tiny_results / "results.json").read_text())
    for r in data["records"]:
        for o in r["outcomes"]:
            assert o["matches_ours"] is not False, (r["case"], r["workload"], o["method"])


def test_benches_unavailable_methods_say_why(tiny_results):
    data = json.loads((tiny_results / "results.json").read_text())
    for r in data["records"]:
        for o in r["outcomes"]:
            if o["status"] != "ok":
                assert o["note"] and not o["times_s"], (r["case"], o["method"])


def test_benches_no_workload_files_left_behind(tiny_results):
    assert not list(tiny_results.glob("vhdx-bench-*"))


def test_bench_cmd_measure_storage_reports_flatten_and_limit(tmp_path):
    from vhdx_cli.storage_bench import measure_storage

    result = measure_storage(str(tmp_path), 64 << 20, repeats=1)
    rows = {row.operation: row for row in result.rows}
    assert rows["flatten chain to raw"].status == "ok"
    assert rows["flatten chain to raw"].vs_raw_copy > 0
    assert "flatten chain to raw" in bench_text(result)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # starts a Dask cluster and times five methods: about 10-25 s
def test_benches_scan_case_times_every_method_against_the_floor(tmp_path):
    from dataclasses import replace

    from benches import cases
    from benches.sizes import TINY

    records = cases.scan_case(str(tmp_path), replace(TINY, scan_disks=20))
    assert [r["workload"] for r in records] == ["fleet-20 warm", "fleet-20 cold"]
    for r in records:
        by_role = {o.role: o for o in r["outcomes"]}
        assert by_role["ours"].status == "ok" and by_role["limit"].status == "ok"
        assert len(by_role["ours"].times) == TINY.repeats
    assert not (tmp_path / "fleet").exists()


def test_benches_startup_case_times_each_command_against_the_import_floor(tmp_path):
    from benches import cases_startup
    from benches.sizes import TINY

    records = cases_startup.startup_case(str(tmp_path), TINY)
    assert [r["workload"] for r in records] == ["vhdx --version", "vhdx info small.vhdx", "import vhdx"]
    for r in records:
        assert [(o.role, o.status) for o in r["outcomes"]] == [("ours", "ok"), ("limit", "ok")], r["workload"]
        assert all(len(o.times) == cases_startup.STARTUP_RUNS for o in r["outcomes"])
