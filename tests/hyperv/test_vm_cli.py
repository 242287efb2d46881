from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.support.hyperv_oracle import sample
from vhdx_cli.main import cli

VM_SAMPLES = {
    # file: (name, id, created, drive lines)
    "test.vmcx": ("Other Location", "282874FC-59D6-4F30-BC04-5FDD909C82E0", "2021-08-22 21:41:00 UTC",
                  ["IDE 0:0  VHD  C:\\Users\\Public\\Documents\\Hyper-V\\Virtual Hard Disks\\Other Location.vhdx",
                   "IDE 1:0  ISO  (empty)"]),
    "EC04F346-DB96-4700-AF5B-77B3C56C38BD.vmcx": (
        "Default Generation 1", "EC04F346-DB96-4700-AF5B-77B3C56C38BD", "2023-02-17 17:03:06 UTC",
        ["IDE 0:0  VHD  C:\\Disks\\Default Generation 1.vhdx"]),
    "B90AC31B-C6F8-479F-9B91-07B894A6A3F6.xml": ("Default Generation 1", "B90AC31B-C6F8-479F-9B91-07B894A6A3F6",
                                                 "-", ["IDE 0:0  VHD  C:\\Disks\\Default Generation 1.vhdx"]),
    "D351C151-DAC7-4042-B434-B72D522C1E4A.xml": ("Default Generation 2", "D351C151-DAC7-4042-B434-B72D522C1E4A",
                                                 "-", ["SCSI 0:0  VHD  C:\\Disks\\Default Generation 2.vhdx"]),
}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("name", sorted(VM_SAMPLES))
def test_vm_show_prints_name_id_creation_date_and_drives_of_each_sample(name):
    vm_name, vm_id, created, drives = VM_SAMPLES[name]
    result = run("vm", "show", sample(name))
    assert result.exit_code == 0, result.output
    assert f"VM {vm_name}\n" in result.output
    assert f"id: {vm_id}" in result.output
    assert f"created: {created}" in result.output
    for line in drives:
        assert line in result.output


def test_vm_show_reads_the_generation_from_the_configuration():
    assert "generation: 2 " in run("vm", "show", sample("D351C151-DAC7-4042-B434-B72D522C1E4A.xml")).output
    assert "generation: 1 " in run("vm", "show", sample("test.vmcx")).output


def test_vm_show_json_names_the_drive_controller_and_type():
    result = run("vm", "show", "--json", sample("D351C151-DAC7-4042-B434-B72D522C1E4A.xml"))
    vm = json.loads(result.output)["vms"][0]
    disk = [d for d in vm["drives"] if d["type"] == "VHD"][0]
    assert (disk["controller_type"], disk["controller"], disk["location"]) == ("SCSI", 0, 0)
    assert disk["local"] is None and "not found" in disk["found_by"]


def test_vm_show_of_the_host_inventory_lists_the_registered_vms():
    result = run("vm", "show", sample("data.vmcx"))
    assert result.exit_code == 0
    assert "4 registered VM(s)" in result.output
    assert "EC04F346-DB96-4700-AF5B-77B3C56C38BD  C:\\Hyper-V\\EasyToFind\\Virtual Machines\\" in result.output


def test_vm_show_of_a_runtime_state_file_says_what_it_is():
    result = run("vm", "show", sample("test.VMRS"))
    assert result.exit_code == 0
    assert "runtime state file" in result.output


def test_vm_show_of_a_damaged_configuration_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.vmcx"
    data = bytearray(sample("test.vmcx").read_bytes())
    data[0x3000 + 10] = 0x0C  # unknown value type
    bad.write_bytes(bytes(data))
    result = run("vm", "show", bad)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "unknown value type 12" in result.output
    assert "Traceback" not in result.output


def test_fixture_build_vm_checkpoints_makes_a_vm_folder(tmp_path):
    out = tmp_path / "vm"
    result = run("fixture", "build", "vm-checkpoints", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["checkpoints"]) >= 2
    assert (out / "Virtual Machines" / f"{manifest['vm']['id']}.vmcx").is_file()


def test_fixture_build_vm_checkpoints_refuses_an_existing_vm_folder(tmp_path):
    out = tmp_path / "vm"
    assert run("fixture", "build", "vm-checkpoints", out).exit_code == 0
    before = sorted(p.name for p in out.rglob("*"))
    result = run("fixture", "build", "vm-checkpoints", out)
    assert result.exit_code == 1 and "is not empty" in result.output
    assert sorted(p.name for p in out.rglob("*")) == before
    # Even with --force, a folder that already holds a VM is not built over.
    result = run("fixture", "build", "vm-checkpoints", out, "--force")
    assert result.exit_code == 1 and "already holds a VM folder" in result.output
    assert sorted(p.name for p in out.rglob("*")) == before
