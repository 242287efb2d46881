"""Faults during a scan: each becomes a result and the scan completes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support import fault_executors
from vhdx.fleet import output
from vhdx.fleet.executor import dask_executor, local_executor
from vhdx.fleet.probe import VANISHED
from vhdx.fleet.scan import scan
from vhdx_fixtures.fleet import write_disk


@pytest.fixture
def small_tree(tmp_path):
    """Eight folders of a base disk and two checkpoints each."""
    paths = []
    for v in range(8):
        folder = tmp_path / f"vm{v}"
        folder.mkdir()
        base = str(folder / "base.vhdx")
        write_disk(base)
        mid = str(folder / "cp1.avhdx")
        write_disk(mid, base)
        write_disk(str(folder / "cp2.avhdx"), mid)
        paths += [base, mid, str(folder / "cp2.avhdx")]
    return tmp_path, sorted(paths)


@pytest.mark.parametrize("jobs", [1, 2])
def test_file_that_vanishes_during_the_scan_is_reported(small_tree, jobs):
    root, paths = small_tree
    victim = str(root / "vm3" / "cp1.avhdx")
    with local_executor(jobs) as executor:
        result = scan([root], fault_executors.DeleteBeforeProbe(executor, victim), batch_files=2)
    s = output.summary(result)
    assert s["unreadable"] == [{"path": victim, "error": VANISHED, "vanished": True}]
    assert s["orphans"] == [str(root / "vm3" / "cp2.avhdx")]
    assert len(result.forest.nodes) == len(paths)
    assert output.exit_code(result) == 2


def test_unreadable_file_is_reported_and_the_rest_scanned(tmp_path):
    good, locked = str(tmp_path / "good.vhdx"), str(tmp_path / "locked.vhdx")
    write_disk(good)
    write_disk(locked)
    os.chmod(locked, 0o000)
    command = [sys.executable, "-m", "vhdx_cli.main", "scan", "--jobs", "1", "--json", str(tmp_path)]
    if os.geteuid() == 0:  # root reads anything: run the scan without the capabilities that bypass permissions
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv is absent: cannot make a file unreadable")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    doc = json.loads(run.stdout)
    assert doc["summary"]["unreadable"] == [
        {"path": locked, "error": "cannot open: Permission denied", "vanished": False}]
    assert [d["parent_status"] for d in doc["disks"]] == ["none", "unknown"]


def test_killed_local_worker_is_replaced_and_its_task_rerun(small_tree, tmp_path_factory):
    root, paths = small_tree
    marker = str(tmp_path_factory.mktemp("kill") / "killed")
    with local_executor(2) as executor:
        result = scan([root], fault_executors.KillWorkerAt(executor, marker), batch_files=2)
    assert os.path.exists(marker)  # a worker really died
    assert sorted(result.forest.nodes) == paths
    assert output.summary(result)["unreadable"] == [] and result.failed_tasks == 0
    assert output.summary(result)["retried_tasks"] >= 1


def test_killed_dask_worker_is_retried_by_dask(small_tree, dask_address, tmp_path_factory):
    import cloudpickle

    cloudpickle.register_pickle_by_value(fault_executors)  # the workers need not import the tests
    root, paths = small_tree
    marker = str(tmp_path_factory.mktemp("kill") / "killed")
    with dask_executor(dask_address) as executor:
        result = scan([root], fault_executors.KillWorkerAt(executor, marker), batch_files=2)
    assert os.path.exists(marker)
    assert sorted(result.forest.nodes) == paths
    assert output.summary(result)["unreadable"] == [] and result.failed_tasks == 0
    assert output.summary(result)["orphans"] == []


def test_file_that_kills_every_worker_costs_only_its_own_result(small_tree):
    root, paths = small_tree
    poison = str(root / "vm2" / "cp1.avhdx")
    with local_executor(2) as executor:
        result = scan([root], fault_executors.PoisonFile(executor, poison), batch_files=8)
    unreadable = output.summary(result)["unreadable"]
    assert [u["path"] for u in unreadable] == [poison] and "BrokenProcessPool" in unreadable[0]["error"]
    assert sorted(result.forest.nodes) == paths and result.failed_tasks == 1
