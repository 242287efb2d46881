"""The benchmark harness runs end to end on tiny disks (keeps ``python -m benches`` from rotting).

Only that it runs and that its outputs hold what they claim is tested here; timings belong in benches/.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benches import measure, page_reporting
from benches import run as bench_run
from benches.report import primary
from vhdx_cli.bench_cmds import bench_text

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def launches(mp: pytest.MonkeyPatch):
    """Every command started through subprocess.run meanwhile, as (argv without GNU time's prefix, cwd)."""
    seen: list[tuple[list[str], str | None]] = []
    real = subprocess.run

    def spy(args, *more, **kwargs):
        argv = [str(a) for a in args]
        if measure.GNU_TIME and argv[:1] == [measure.GNU_TIME]:
            argv = argv[6:]  # time -q -f %M -o FILE
        seen.append((argv, kwargs.get("cwd")))
        return real(args, *more, **kwargs)

    mp.setattr(subprocess, "run", spy)
    yield seen


def runs_our_code(argv: list[str]) -> bool:
    """A process that starts vhdx (or the floor beside it): the console script or a Python that is not pip's or
    compileall's (set-up steps)."""
    program = os.path.basename(argv[0])
    return program == "vhdx" or (program.startswith("python") and argv[1:3] not in (["-m", "pip"],
                                                                                      ["-m", "compileall"]))


def assert_all_in_bench_venv(seen, install: measure.Install) -> None:
    ours = [(argv, cwd) for argv, cwd in seen if runs_our_code(argv)]
    assert ours, "no process of ours was started"
    for argv, cwd in ours:
        assert Path(argv[0]).parent == Path(install.python).parent, argv  # the bench venv's bin/
        assert cwd is not None and not Path(cwd, "vhdx").exists(), (argv, cwd)  # `-c` puts the cwd on sys.path


@pytest.fixture(scope="module")
def bench_wheel(tmp_path_factory):
    """The checkout's wheel, built once for the module (every bench run here reuses it)."""
    wheel = measure.build_wheel(str(tmp_path_factory.mktemp("wheel")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(measure, "build_wheel", lambda folder: wheel)
        yield wheel


@pytest.fixture(scope="module")
def bench_install(bench_wheel, tmp_path_factory):
    with measure.installed_copy(str(tmp_path_factory.mktemp("install"))) as install:
        yield install


@pytest.fixture(scope="module")
def tiny_results(bench_wheel, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp, launches(mp) as seen:
        bench_run.run(["--profile", "tiny", "--out", str(out), "--only", "flatten", "--only", "reads",
                       "--only", "merge", "--only", "create", "--no-charts"])
    (out / "launches.json").write_text(json.dumps(seen))
    return out


def test_benches_writes_json_and_markdown(tiny_results):
    data = json.loads((tiny_results / "results.json").read_text())
    assert data["profile"] == "tiny"
    assert {r["case"] for r in data["records"]} >= {"flatten to raw", "random 4 KiB reads", "sequential 1 MiB reads",
                                                    "merge child into parent"}
    assert "### flatten to raw" in (tiny_results / "results.md").read_text()


def test_benches_ours_runs_in_every_case(tiny_results):
    data = json.loads((tiny_results / "results.json").read_text())
    for r in data["records"]:
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


def test_benches_report_says_ours_is_a_regular_install_of_the_checkout(tiny_results):
    data = json.loads((tiny_results / "results.json").read_text())
    assert data["install"] == measure.REGULAR_INSTALL
    header = (tiny_results / "results.md").read_text().splitlines()[:3]
    assert [line for line in header if line.startswith("Ours: ")] == [f"Ours: {measure.REGULAR_INSTALL}."]
    assert [line for line in header if line.startswith("Machine: ")]


def test_benches_report_says_what_free_page_reporting_did(tiny_results):
    data = json.loads((tiny_results / "results.json").read_text())
    seen = page_reporting.Reporting(page_reporting._order())  # this run did not pause it
    expected = "no free page reporting" if seen.order is None else (
        "free page reporting to the host active" if seen.active else "free page reporting to the host reports nothing")
    assert data["page_reporting"].startswith(expected)
    assert f"Memory: {data['page_reporting']}." in (tiny_results / "results.md").read_text().splitlines()


def test_benches_cli_rows_and_the_merge_probe_run_the_bench_venv(tiny_results):
    seen = json.loads((tiny_results / "launches.json").read_text())
    ours = [argv for argv, _ in seen if runs_our_code(argv)]
    assert any(os.path.basename(argv[0]) == "vhdx" and argv[1] == "create" for argv in ours)
    assert any(argv[1].endswith("merge_probe.py") for argv in ours)
    venvs = {Path(argv[0]).parent.parent for argv in ours}
    assert len(venvs) == 1 and venvs.pop().parent.parent.name.startswith("vhdx-bench-")  # the run's own venv
    assert all(cwd is not None and not Path(cwd, "vhdx").exists() for argv, cwd in seen if runs_our_code(argv))


# --- the installed copy the benches time ----------------------------------------------------------------------


def test_bench_install_is_a_venv_of_its_own_with_its_vhdx_console_script(bench_install):
    assert bench_install.how == measure.REGULAR_INSTALL
    assert Path(bench_install.vhdx).parent == Path(bench_install.python).parent
    assert (Path(bench_install.python).parent.parent / "pyvenv.cfg").exists()
    assert Path(sys.executable).parent != Path(bench_install.python).parent


def test_bench_install_imports_vhdx_from_its_site_packages_even_when_started_in_the_checkout(bench_install,
                                                                                              monkeypatch):
    monkeypatch.chdir(ROOT)
    done = measure.run_ours([bench_install.python, "-c", "import vhdx, vhdx_cli; print(vhdx.__file__); "
                                                          "print(vhdx_cli.__file__)"])
    for line in done["stdout"].split():
        assert Path(line).is_relative_to(bench_install.site_packages), line


def test_bench_install_reuses_the_running_dependencies_without_their_pth_hooks(bench_install):
    import numpy

    code = "import sys; start = sorted(sys.modules); import numpy; print(numpy.__file__); print(*start)"
    lines = measure.run_ours([bench_install.python, "-c", code])["stdout"].splitlines()
    assert lines[0] == numpy.__file__
    loaded = lines[1].split()
    assert [m for m in loaded if "editable" in m or m == "_distutils_hack"] == []
    assert "pathlib" not in loaded


def test_bench_install_console_script_runs(bench_install):
    assert measure.run_ours([bench_install.vhdx, "--version"])["stdout"].strip()


def test_bench_bytecode_cache_covers_the_installed_copy(bench_install, tmp_path):
    with measure.bytecode_cache(str(tmp_path)):
        measure.compile_sources("vhdx")
    installed = tmp_path / Path(bench_install.site_packages).relative_to("/") / "vhdx"
    assert list(installed.glob("__init__.*.pyc")) and list(installed.glob("ops/inspect.*.pyc"))
    before = {p: p.stat().st_mtime_ns for p in installed.parent.rglob("*.pyc")}
    with measure.bytecode_cache(str(tmp_path)):
        measure.run_ours([bench_install.python, "-c", "import vhdx, vhdx_cli.main"])
    assert {p: p.stat().st_mtime_ns for p in installed.parent.rglob("*.pyc")} == before  # found, none written again


def test_bench_install_falls_back_to_the_running_copy_and_says_why(tmp_path, monkeypatch):
    def fail(folder):
        raise measure.InstallFailed("no wheel here")

    monkeypatch.setattr(measure, "build_wheel", fail)
    with measure.installed_copy(str(tmp_path)) as install:
        assert measure.our_copy() is install
    assert install.python == sys.executable and "no wheel here" in install.how
    assert measure.our_copy() != install


def test_benches_scale_create_runs_the_bench_venv_vhdx(bench_install, tmp_path, monkeypatch):
    from benches import cases_scale

    monkeypatch.setattr(cases_scale.peers, "qemu_img", lambda: (None, "missing: not timed here"))  # 512 MiB BAT
    with launches(monkeypatch) as seen:
        record = cases_scale.create_64t(str(tmp_path), 1)
    assert record["outcomes"][0].status == "ok", record["outcomes"][0].note
    assert_all_in_bench_venv(seen, bench_install)


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


def test_benches_startup_case_times_each_command_against_the_import_floor(bench_install, tmp_path, monkeypatch):
    from benches import cases_startup
    from benches.sizes import TINY

    monkeypatch.chdir(ROOT)  # as `python -m benches` runs
    with launches(monkeypatch) as seen:
        records = cases_startup.startup_case(str(tmp_path), TINY)
    assert_all_in_bench_venv(seen, bench_install)  # ours and the floor alike
    assert {os.path.basename(argv[0]) for argv, _ in seen} >= {"vhdx", os.path.basename(bench_install.python)}
    assert [r["workload"] for r in records] == ["vhdx --version", "vhdx info small.vhdx", "import vhdx"]
    for r in records:
        assert [(o.role, o.status) for o in r["outcomes"]] == [("ours", "ok"), ("limit", "ok")], r["workload"]
        assert all(len(o.times) == cases_startup.STARTUP_RUNS for o in r["outcomes"])


def test_target_rows_take_at_least_seven_runs_except_in_the_smoke_profile():
    from benches.sizes import PROFILES, TARGET_RUNS, target_runs

    assert TARGET_RUNS >= 7
    assert target_runs(PROFILES["quick"]) >= TARGET_RUNS and target_runs(PROFILES["full"]) >= TARGET_RUNS
    assert target_runs(PROFILES["tiny"]) == 1


def test_the_index_read_and_flatten_rows_take_the_target_runs(monkeypatch):
    from types import SimpleNamespace

    from benches import cases, cases_reads
    from benches.sizes import PROFILES, target_runs

    seen = []

    def fake(case):
        def run(w, tmp, profile, *rest):
            seen.append(profile.repeats)
            return {"case": case, "workload": w.name, "outcomes": []}
        return run

    monkeypatch.setattr(cases, "reads", lambda w, tmp, profile, pattern: fake(
        "random 4 KiB reads" if pattern == "random" else "sequential 1 MiB reads")(w, tmp, profile))
    monkeypatch.setattr(cases, "flatten", fake("flatten to raw"))
    chains = [SimpleNamespace(name=f"rand4k-d{d}", depth=d) for d in (1, 4, 16)]
    records = cases_reads.index_reads(chains, "/nonexistent", PROFILES["quick"], "/nonexistent")
    assert len(records) == 7 and set(seen) == {target_runs(PROFILES["quick"])}


def _machine_placeholder() -> dict:
    """The machine description the report prints, every field "x"."""
    return {k: "x" for k in ("nproc", "cpu", "memory", "filesystem", "kernel", "python", "numpy", "qemu-img",
                             "libvhdi-python", "dissect.hypervisor")}


def test_report_header_says_how_many_runs_the_target_rows_take():
    from benches import report

    machine = _machine_placeholder()
    header = report.markdown({"profile": "quick", "repeats": 3, "machine": machine, "records": []}).splitlines()[0]
    assert "3 runs per method (at least 7 for the rows that carry an issue-15 target)" in header
    header = report.markdown({"profile": "tiny", "repeats": 1, "machine": machine, "records": []}).splitlines()[0]
    assert "1 runs per method," in header


def test_report_gives_the_machine_speed_at_the_start_and_the_end_of_the_run(monkeypatch):
    from benches import report

    monkeypatch.setattr(report, "LOOP_STEPS", 1000)
    monkeypatch.setattr(report, "COPY_BYTES", 4096)
    measured = report.speed()
    assert set(measured) == {"python_loop_ms", "copy_ms"} and all(v >= 0 for v in measured.values())
    machine = _machine_placeholder()
    speed = {"start": {"python_loop_ms": 80.5, "copy_ms": 30.0}, "end": {"python_loop_ms": 160.0, "copy_ms": 61.2}}
    text = report.markdown({"profile": "quick", "repeats": 3, "machine": machine, "speed": speed, "records": []})
    assert "80.5 / 160.0 ms" in text and "30.0 / 61.2 ms" in text
