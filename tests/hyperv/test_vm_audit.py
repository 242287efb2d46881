from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vhdx.hyperv.config.writer import with_pending_log
from vhdx.hyperv.vm_audit import audit_folder
from vhdx_cli.main import cli
from vhdx_fixtures.vm_folder import build_vm_folder, load_vm_spec


def build(tmp_path, **changes) -> tuple[Path, dict]:
    out = tmp_path / "vm"
    spec = dataclasses.replace(load_vm_spec("vm-checkpoints"), **changes)
    return out, build_vm_folder(spec, str(out))


def audit_json(folder) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, ["vm", "audit", "--json", str(folder)])
    return result.exit_code, json.loads(result.output)


def digests(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_audit_lists_exactly_the_orphans_the_spec_left(tmp_path):
    folder, manifest = build(tmp_path)
    _code, report = audit_json(folder)
    got = sorted((o["path"], o["on_chain"], o["bytes"]) for o in report["orphans"])
    want = sorted((str(folder / o["path"]), o["on_chain"], o["bytes"]) for o in manifest["orphans"])
    assert got == want
    assert report["orphan_bytes"] == sum(o["bytes"] for o in manifest["orphans"])


def test_audit_lists_exactly_the_missing_disks_and_exits_2(tmp_path):
    folder, manifest = build(tmp_path)
    code, report = audit_json(folder)
    assert code == 2
    assert [(m["owner"], m["slot"], m["path"]) for m in report["missing"]] == \
        [(m["owner"], m["slot"], m["path"]) for m in manifest["missing"]]
    assert report["broken"] == []


def test_audit_plans_the_offline_merge_of_the_lost_checkpoint_disk_with_dry_run_numbers(tmp_path):
    folder, manifest = build(tmp_path)
    _code, report = audit_json(folder)
    merges = [s for s in report["plan"] if "dry_run" in s]
    assert len(merges) == 1
    lost = next(str(folder / o["path"]) for o in manifest["orphans"] if o["on_chain"])
    running = str(folder / manifest["vm"]["running_disk"])
    step = merges[0]
    assert step["mode"] == "offline" and step["requires_vm_off"]
    assert step["dry_run"]["merged"] == [running]
    assert step["dry_run"]["destination"] == lost
    assert step["dry_run"]["space_freed"] == Path(running).stat().st_size - step["dry_run"]["space_needed"]
    host_path = "C:\\Hyper-V\\web01\\Virtual Hard Disks\\" + Path(lost).name
    assert f"point drive SCSI 0:0 of VM 'web01' at {host_path} " in step["configuration_change"]
    assert step["commands"][-1].endswith(f"-Path '{host_path}'")  # Set-VMHardDiskDrive names the host's path


def test_audit_sends_the_recovery_checkpoint_to_hyperv_online(tmp_path):
    folder, _manifest = build(tmp_path)
    _code, report = audit_json(folder)
    online = [s for s in report["plan"] if s["mode"] == "online" and "offline" in s]
    assert [s["commands"] for s in online] == [["vhdx hyperv remove-checkpoint web01 'Veeam backup' --wait"]]
    assert "must be removed by Hyper-V" in online[0]["offline"]


def test_audit_plans_review_of_the_orphan_in_no_chain(tmp_path):
    folder, manifest = build(tmp_path)
    _code, report = audit_json(folder)
    stray = next(o for o in manifest["orphans"] if not o["on_chain"])
    steps = [s for s in report["plan"] if s.get("space_freed") == stray["bytes"]]
    assert steps and str(folder / stray["path"]) in steps[0]["title"]


def test_audit_writes_nothing(tmp_path):
    folder, _manifest = build(tmp_path)
    before = digests(folder)
    audit_json(folder)
    CliRunner().invoke(cli, ["vm", "show", str(folder)])
    assert digests(folder) == before


def test_audit_of_a_clean_vm_folder_exits_0(tmp_path):
    spec = load_vm_spec("vm-checkpoints")
    folder, _manifest = build(tmp_path, checkpoints=spec.checkpoints[:2], orphans=(), missing=())
    code, report = audit_json(folder)
    assert code == 0, report["plan"]
    assert report["orphans"] == [] and report["missing"] == [] and report["plan"] == []


def test_audit_with_only_orphans_exits_3(tmp_path):
    spec = load_vm_spec("vm-checkpoints")
    folder, _manifest = build(tmp_path, checkpoints=spec.checkpoints[:2], missing=())
    code, report = audit_json(folder)
    assert code == 3
    assert [o["on_chain"] for o in report["orphans"]] == [False]


def test_audit_reports_a_chain_broken_by_a_deleted_base_and_the_checkpoint_that_lost_its_disk(tmp_path):
    folder, _manifest = build(tmp_path)
    (folder / "Virtual Hard Disks" / "web01.vhdx").unlink()
    code, report = audit_json(folder)
    assert code == 2
    assert any(m["owner"] == "checkpoint 'Before update'" for m in report["missing"])
    assert any(b["owner"] == "web01" and "web01.vhdx" in b["error"] for b in report["broken"])


def test_audit_reports_an_interrupted_merge(tmp_path):
    folder, _manifest = build(tmp_path)
    journal = folder / "Virtual Hard Disks" / "web01.vhdx.merge-journal"
    journal.write_text("{}")
    code, report = audit_json(folder)
    assert code == 2
    assert report["interrupted_merges"] == [str(journal)]


def test_audit_replays_a_dirty_configuration_in_memory_and_says_so(tmp_path):
    folder, manifest = build(tmp_path)
    config = folder / "Virtual Machines" / f"{manifest['vm']['id']}.vmcx"
    clean = config.read_bytes()
    dirty = bytearray(with_pending_log(clean, [(0x3000, clean[0x3000:0x4000])]))
    dirty[0x3000:0x4000] = bytes(0x1000)
    config.write_bytes(bytes(dirty))
    _code, report = audit_json(folder)
    assert report["vms"][0]["name"] == "web01"
    assert report["dirty"] == [{"path": str(config), "what": "configuration replay log (replayed in memory)"}]
    assert config.read_bytes() == bytes(dirty)


def test_vm_audit_text_uses_the_live_audit_rendering(tmp_path):
    folder, _manifest = build(tmp_path)
    text = CliRunner().invoke(cli, ["vm", "audit", str(folder)]).output
    assert "disk SCSI 0:0: runs on 5 layer(s)" in text
    assert "(online) remove recovery checkpoint 'Veeam backup'" in text
    assert "orphans hold 14 MiB" in text


@pytest.mark.parametrize("bad", ["nothing-here"])
def test_vm_audit_of_a_folder_without_a_vm_is_a_one_line_error(tmp_path, bad):
    (tmp_path / bad).mkdir()
    result = CliRunner().invoke(cli, ["vm", "audit", str(tmp_path / bad)])
    assert result.exit_code == 1 and "no VM configuration" in result.output
    assert result.output.count("\n") == 1


def test_audit_folder_api_matches_the_cli(tmp_path):
    folder, _manifest = build(tmp_path)
    assert audit_folder(str(folder)).to_json()["orphans"] == audit_json(folder)[1]["orphans"]


def test_vm_audit_prints_the_live_audit_report_verbatim(tmp_path):
    from vhdx_cli.hyperv_cmds import audit_text

    folder, _manifest = build(tmp_path)
    report = audit_folder(str(folder)).reports[0]
    text = CliRunner().invoke(cli, ["vm", "audit", str(folder)]).output
    assert text.startswith(audit_text(report) + "\n")


def test_layers_above_a_break_stay_in_their_chain_not_among_the_orphans(tmp_path):
    folder, manifest = build(tmp_path)
    (folder / "Virtual Hard Disks" / "web01.vhdx").unlink()
    _code, report = audit_json(folder)
    off_chain = [o["path"] for o in report["orphans"] if not o["on_chain"]]
    assert off_chain == [str(folder / o["path"]) for o in manifest["orphans"] if not o["on_chain"]]
    running = next(b for b in report["broken"] if b["owner"] == "web01")
    assert "web01.vhdx" in running["error"]


def test_a_folder_with_too_many_files_is_refused_with_a_one_line_error(tmp_path, monkeypatch):
    import vhdx.hyperv.vm as vm_module

    folder, _manifest = build(tmp_path)
    monkeypatch.setattr(vm_module, "MAX_FOLDER_ENTRIES", 5)
    result = CliRunner().invoke(cli, ["vm", "audit", str(folder)])
    assert result.exit_code == 1 and "is this a VM folder?" in result.output
    assert result.output.count("\n") == 1


def test_the_planned_merge_runs_as_printed_and_the_target_then_reads_what_the_vm_saw(tmp_path):
    import shlex

    import vhdx

    folder, manifest = build(tmp_path)
    _code, report = audit_json(folder)
    step = next(s for s in report["plan"] if "dry_run" in s)
    dry, real = (shlex.split(c)[1:] for c in step["commands"][:2])
    assert dry[-1] == "--dry-run" and dry[:-1] == real
    running = str(folder / manifest["vm"]["running_disk"])
    with vhdx.open(running) as image:
        before = image.read(0, image.virtual_size)
    assert CliRunner().invoke(cli, dry).exit_code == 0
    assert Path(running).exists()  # the dry run wrote nothing
    result = CliRunner().invoke(cli, real)
    assert result.exit_code == 0, result.output
    with vhdx.open(step["dry_run"]["destination"]) as image:
        assert image.read(0, image.virtual_size) == before
    assert not Path(running).exists()


def test_audit_warns_when_the_vm_holds_saved_memory_state(tmp_path):
    from vhdx.hyperv.config.writer import build_storage

    folder, manifest = build(tmp_path)
    vmrs = folder / "Virtual Machines" / f"{manifest['vm']['id']}.vmrs"
    vmrs.unlink()
    vmrs.write_bytes(build_storage({"configuration": {"memory": {"data": bytes(2 << 20)}}}))
    _code, report = audit_json(folder)
    assert len(report["warnings"]) == 1 and "'web01' is saved, not off" in report["warnings"][0]
    assert "WARNING: VM 'web01' is saved" in CliRunner().invoke(cli, ["vm", "audit", str(folder)]).output


def test_audit_of_a_vm_without_saved_memory_has_no_warning(tmp_path):
    folder, _manifest = build(tmp_path)
    assert audit_json(folder)[1]["warnings"] == []
