from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vhdx.hyperv import scripts
from vhdx_cli.main import cli


def run(recording, *args, names=()):
    replay = [a for n in names for a in ("--replay", recording(n))]
    return CliRunner().invoke(cli, ["hyperv", *replay, *args], catch_exceptions=False)


def test_cli_checkpoints_renders_branching_tree(recording):
    result = run(recording, "checkpoints", "web01", names=["web01"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "web01 (Running, checkpoint setting: Production)"
    assert lines[1].startswith("`-- before-upgrade  [standard]  2024-03-01T09:15:02")
    assert lines[3].startswith("    |-- test-branch  [production]")
    assert lines[5].startswith("    `-- patch-tuesday  [production]")
    assert lines[7].startswith("        `-- web01 - Backup - 2024-04-02T01:00:07  [recovery] (SnapshotType Recovery)")
    assert lines[9].startswith("            `-- Now (running state: D:\\Hyper-V\\web01")


def test_cli_checkpoints_json(recording):
    result = run(recording, "checkpoints", "web01", "--json", names=["web01"])
    data = json.loads(result.output)
    kinds = {c["name"]: c["kind"] for c in data["checkpoints"]}
    assert kinds == {"before-upgrade": "standard", "patch-tuesday": "production", "test-branch": "production",
                     "web01 - Backup - 2024-04-02T01:00:07": "recovery"}
    assert data["vm"]["parent_checkpoint_id"] == "b04aefb7-d19e-4a81-b789-25b8e3f6a91c"


def test_cli_audit_names_recovery_and_orphan(recording):
    result = run(recording, "audit", "web01", names=["web01"])
    assert result.exit_code == 0
    out = result.output
    assert "recovery checkpoint: web01 - Backup - 2024-04-02T01:00:07" in out
    assert "orphan          7 GiB  D:\\Hyper-V\\web01\\Virtual Hard Disks\\web01_A3C5E7F9" in out
    assert "1. (online) remove recovery checkpoint" in out
    assert "vhdx merge 'D:\\Hyper-V\\web01\\Virtual Hard Disks\\web01_D41D8CD9" in out


def test_cli_audit_json(recording):
    data = json.loads(run(recording, "audit", "db01", "--json", names=["db01"]).output)
    assert data["lingering_bytes"] == 3_221_225_472
    assert data["steps"][0]["commands"][0].startswith("vhdx merge E:\\VMs\\db01\\db01_6666")


def test_cli_remove_checkpoint_dry_run_prints_exact_script(recording):
    name = "nightly'; Remove-Item -Recurse C:\\ ; '$(x)`\nnext"
    result = run(recording, "remove-checkpoint", "app01", name, "--subtree", "--dry-run")
    assert result.exit_code == 0
    assert scripts.REMOVE_CHECKPOINT.text.rstrip() in result.output
    params = json.loads(result.output.split("never pasted into the text):\n", 1)[1])
    assert params == {"VMName": "app01", "Name": name, "IncludeAllChildSnapshots": True}


def test_cli_merge_dry_run_contacts_nobody():
    result = CliRunner().invoke(cli, ["hyperv", "--host", "unreachable.invalid", "merge", "D:\\c.avhdx", "--into",
                                      "D:\\base.vhdx", "--dry-run"])
    assert result.exit_code == 0
    assert "# script: Merge-VHD" in result.output
    assert '"DestinationPath": "D:\\\\base.vhdx"' in result.output


def test_cli_remove_checkpoint_wait(recording, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    result = run(recording, "remove-checkpoint", "app01", "nightly", "--wait", names=["app01-merge"])
    assert result.exit_code == 0
    assert "removed checkpoint nightly of app01" in result.output
    assert "merge finished" in result.output and "app01_F9E8D7C6" in result.output


def test_cli_merge_job_failure_is_one_line(recording, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    result = run(recording, "remove-checkpoint", "app01", "nightly", "--wait", names=["app01-merge-fails"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("vhdx: error: merge job: Merging disks exception:")
    assert lines[-1].endswith("(code 32768)")


@pytest.mark.parametrize(("args", "message"), [
    (["vms"], "vhdx: error: Get-VM: the Hyper-V PowerShell module is not installed on this host"),
    (["checkpoints", "ghost"], "vhdx: error: Get-VMSnapshot: no virtual machine is named ghost"),
    (["info", "D:\\secret\\x.vhdx"], "vhdx: error: Get-VHD: You do not have the required permission"),
])
def test_cli_errors_are_one_line(recording, args, message):
    result = run(recording, *args, names=["errors"])
    assert result.exit_code == 1
    assert result.output.startswith(message)
    assert len(result.output.strip().splitlines()) == 1


def test_cli_psrp_needs_host():
    result = CliRunner().invoke(cli, ["hyperv", "--transport", "psrp", "vms"])
    assert result.exit_code == 1 and "--transport psrp needs --host" in result.output


def test_cli_password_env_must_exist(monkeypatch):
    monkeypatch.delenv("VHDX_TEST_NO_SUCH_VAR", raising=False)
    result = CliRunner().invoke(cli, ["hyperv", "--host", "h", "--password-env", "VHDX_TEST_NO_SUCH_VAR", "vms"])
    assert result.exit_code == 1 and "VHDX_TEST_NO_SUCH_VAR is not set" in result.output


def test_cli_check_failure_exit_2(recording):
    path = "D:\\Hyper-V\\web01\\Virtual Hard Disks\\web01_5E6F7081-92A3-4B4C-8D5E-6F708192A3B4.avhdx"
    result = run(recording, "check", path, names=["disks"])
    assert result.exit_code == 2
    assert "FAILED" in result.output and "cannot locate the parent" in result.output


def test_cli_info_compare_agrees_on_real_image(recording, corpus_image):
    local = corpus_image("dissect.hypervisor/fixed.vhdx.gz")
    result = run(recording, "info", "D:\\images\\fixed.vhdx", "--compare", str(local), names=["disks"])
    assert result.exit_code == 0, result.output
    assert "agree on every field" in result.output


def test_cli_info_compare_reports_differing_fields(recording, corpus_image, tmp_path):
    local = corpus_image("dissect.hypervisor/fixed.vhdx.gz")
    data = json.loads(Path(recording("disks")).read_text(encoding="utf-8"))
    answer = data["exchanges"][0]["responses"][0]["data"]
    answer["Size"] = 20971520
    answer["PhysicalSectorSize"] = 512
    altered = tmp_path / "altered.json"
    altered.write_text(json.dumps(data), encoding="utf-8")
    result = CliRunner().invoke(cli, ["hyperv", "--replay", str(altered), "info", "D:\\images\\fixed.vhdx",
                                      "--compare", str(local), "--json"])
    assert result.exit_code == 2
    diffs = {d["field"]: (d["hyperv"], d["ours"]) for d in json.loads(result.output)["differences"]}
    assert diffs == {"virtual_size": (20971520, 10485760), "physical_sector_size": (512, 4096)}
