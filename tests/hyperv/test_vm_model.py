from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from tests.support.hyperv_oracle import dissect_tree
from vhdx.hyperv.config import read_config
from vhdx.hyperv.config.writer import write_storage
from vhdx.hyperv.vm import load_folder
from vhdx_fixtures.vm_folder import build_vm_folder, load_vm_spec


@pytest.fixture(scope="module")
def vm_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vm") / "web01"
    build_vm_folder(load_vm_spec("vm-checkpoints"), str(out))
    return out


@pytest.fixture(scope="module")
def manifest(vm_dir) -> dict:
    return json.loads((vm_dir / "manifest.json").read_text())


@pytest.mark.peer
def test_written_configurations_parse_with_dissect_to_the_same_tree(vm_dir):
    files = sorted(vm_dir.rglob("*.vmcx")) + sorted(vm_dir.rglob("*.vmrs"))
    assert len(files) == 6  # VM .vmcx/.vmrs, three checkpoint .vmcx, one standard checkpoint .vmrs
    for path in files:
        assert read_config(str(path)).root == dissect_tree(path), path


def test_vm_model_reads_name_id_generation_and_times(vm_dir, manifest):
    vm = load_folder(str(vm_dir)).vms[0]
    assert (vm.name, vm.id, vm.generation, vm.version) == ("web01", manifest["vm"]["id"], 2, "9.0")
    assert vm.created.isoformat() == "2024-03-01T09:00:00+00:00"
    assert {s.kind for s in vm.state_files} == {"vmrs", "vmgs"}


def test_vm_model_maps_the_running_drive_relative_to_the_vm_folder(vm_dir, manifest):
    vm = load_folder(str(vm_dir)).vms[0]
    drive = vm.drives[0]
    assert drive.slot == "SCSI 0:0"
    assert Path(drive.local) == vm_dir / manifest["vm"]["running_disk"]
    assert drive.found_by == "relative to the VM folder"


def test_vm_model_reports_a_missing_drive_file(vm_dir):
    vm = load_folder(str(vm_dir)).vms[0]
    missing = [d for d in vm.drives if d.is_disk and d.local is None]
    want = ("SCSI 0:1", "C:\\Hyper-V\\web01\\Virtual Hard Disks\\web01-data.vhdx")
    assert [(d.slot, d.path) for d in missing] == [want]


def test_checkpoint_tree_names_types_and_derived_parents_match_the_spec(vm_dir, manifest):
    vm = load_folder(str(vm_dir)).vms[0]
    got = sorted((c.name, c.id, c.kind, c.parent_id) for c in vm.checkpoints)
    want = sorted((c["name"], c["id"], c["type"], c["parent_id"]) for c in manifest["checkpoints"])
    assert got == want
    assert vm.now_parent_id == manifest["now_parent_id"]


def test_checkpoint_disks_map_to_the_layers_they_froze(vm_dir, manifest):
    vm = load_folder(str(vm_dir)).vms[0]
    disks = {c.id: Path(c.drives[0].local) for c in vm.checkpoints}
    assert disks == {c["id"]: vm_dir / c["disk"] for c in manifest["checkpoints"]}


def test_checkpoint_type_says_whether_it_came_from_the_configuration(vm_dir):
    vm = load_folder(str(vm_dir)).vms[0]
    sources = {c.name: c.kind_from for c in vm.checkpoints}
    assert sources == {"Before update": "derived", "After update": "derived", "Veeam backup": "configuration"}


def test_a_disk_symlinked_from_outside_the_vm_folder_is_not_followed(tmp_path, vm_dir):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "web01-data.vhdx").write_bytes(b"x")
    target = tmp_path / "vm"
    build_vm_folder(load_vm_spec("vm-checkpoints"), str(target))
    (target / "Virtual Hard Disks" / "web01-data.vhdx").symlink_to(outside / "web01-data.vhdx")
    vm = load_folder(str(target)).vms[0]
    assert [d.local for d in vm.drives if d.slot == "SCSI 0:1"] == [None]


def test_search_dir_is_used_for_a_disk_outside_the_vm_folder(tmp_path, vm_dir):
    extra = tmp_path / "extra"
    extra.mkdir()
    import vhdx

    vhdx.create_image(extra / "web01-data.vhdx", 1 << 20)
    vm = load_folder(str(vm_dir), search_dirs=[str(extra)]).vms[0]
    drive = [d for d in vm.drives if d.slot == "SCSI 0:1"][0]
    assert Path(drive.local) == extra / "web01-data.vhdx"
    assert drive.found_by.startswith("by file name in")


def test_a_checkpoint_of_a_vm_not_in_the_folder_is_reported_not_dropped(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    build_vm_folder(load_vm_spec("vm-checkpoints"), str(one))
    spec = load_vm_spec("vm-checkpoints")
    build_vm_folder(dataclasses.replace(spec, vm_id="0B0B0B0B-0000-4000-8000-000000000002", vm_name="db01"), str(two))
    for config in (two / "Virtual Machines").glob("*.vmcx"):
        shutil.copy(config, one / "Virtual Machines" / config.name)
    stray = read_config(str(next((one / "Snapshots").glob("*.vmcx")))).root
    stray["configuration"]["settings"]["global"]["logical_id"] = "0C0C0C0C-0000-4000-8000-000000000003"
    path = one / "Snapshots" / "0D0D0D0D-0000-4000-8000-000000000004.vmcx"
    write_storage(str(path), stray)
    folder = load_folder(str(one))
    assert sorted(v.name for v in folder.vms) == ["db01", "web01"]
    assert [(p, "0C0C0C0C-0000-4000-8000-000000000003" in why) for p, why in folder.unreadable] == [(str(path), True)]
    assert all(c.config_path != str(path) for v in folder.vms for c in v.checkpoints)


def test_vm_show_names_the_checkpoint_each_layer_of_the_running_chain_belongs_to(vm_dir, manifest):
    from click.testing import CliRunner

    from vhdx_cli.main import cli

    text = CliRunner().invoke(cli, ["vm", "show", str(vm_dir)]).output
    for c in manifest["checkpoints"]:
        assert f"{vm_dir / c['disk']}  <- {c['name']}" in text
    lost = next(o["path"] for o in manifest["orphans"] if o["on_chain"])
    assert f"{vm_dir / lost}  <- no configuration names it" in text
    assert f"{vm_dir / manifest['vm']['running_disk']}  <- Now" in text
