from __future__ import annotations

import dataclasses

from vhdx.hyperv import audit_vm
from vhdx.hyperv.models import CheckpointTree, checkpoint_kind

WEB = "D:\\Hyper-V\\web01\\Virtual Hard Disks\\"
ORPHAN = WEB + "web01_A3C5E7F9-1B2D-4F60-8A9C-0E1D2F3A4B5C.avhdx"
RECOVERY_DISK = WEB + "web01_0F9E2D11-7A3C-4B6E-8D25-C4E1A9B07F32.avhdx"
LEAF = WEB + "web01_D41D8CD9-8F00-4B20-9E98-00998ECF8427.avhdx"
RECOVERY = "web01 - Backup - 2024-04-02T01:00:07"


def _audit(backend, vm):
    hv = backend(vm if vm != "app01" else "app01-merge")
    return audit_vm(hv.checkpoints(vm), hv.vm_disks(vm))


def test_audit_classifies_each_layer(backend):
    report = _audit(backend, "web01")
    roles = [(layer.role, layer.checkpoints) for layer in report.disks[0].layers]
    assert roles == [("running", ()), ("orphan", ()), ("recovery", (RECOVERY,)), ("checkpoint", ("patch-tuesday",)),
                     ("checkpoint", ("before-upgrade",))]
    assert [layer.path for layer in report.disks[0].lingering] == [ORPHAN, RECOVERY_DISK]
    assert report.lingering_bytes == 7_516_192_768 + 2_147_483_648


def test_audit_names_recovery_checkpoint_and_plans_online_removal(backend):
    report = _audit(backend, "web01")
    assert [c.name for c in report.recovery_checkpoints] == [RECOVERY]
    first = report.steps[0]
    assert first.mode == "online" and not first.requires_vm_off
    assert first.commands == (f"vhdx hyperv remove-checkpoint web01 '{RECOVERY}' --wait",)


def test_audit_plans_offline_fold_of_orphan_on_running_vm(backend):
    report = _audit(backend, "web01")
    offline = [s for s in report.steps if s.mode == "offline" and ORPHAN in s.title]
    assert len(offline) == 1
    assert offline[0].requires_vm_off
    # the orphan sits on a checkpoint's disk, which must not change: the leaf folds into the orphan itself
    assert offline[0].commands == (
        "Stop-VM -Name 'web01'",
        f"vhdx merge '{LEAF}' --into '{ORPHAN}'",
        f"Set-VMHardDiskDrive -VMName 'web01' -ControllerType SCSI -ControllerNumber 0 -ControllerLocation 0 "
        f"-Path '{ORPHAN}'",
        "Start-VM -Name 'web01'",
    )
    modes = [s.mode for s in report.steps]
    assert modes.index("online") < modes.index("offline")


def test_audit_lists_stray_avhdx(backend):
    report = _audit(backend, "web01")
    assert report.disks[0].stray_files == ((WEB + "web01_DEADBEEF-0000-4000-8000-000000000001.avhdx", 268_435_456),)


def test_audit_vm_off_merges_into_unreferenced_base(backend):
    report = _audit(backend, "db01")
    (step,) = report.steps
    assert step.mode == "offline"
    assert step.commands == (
        "vhdx merge E:\\VMs\\db01\\db01_66666666-7777-4888-9999-AAAAAAAAAAAA.avhdx --into E:\\VMs\\db01\\db01.vhdx",
        "Set-VMHardDiskDrive -VMName 'db01' -ControllerType SCSI -ControllerNumber 0 -ControllerLocation 0 "
        "-Path 'E:\\VMs\\db01\\db01.vhdx'",
    )


def test_audit_clean_vm_has_no_plan(backend):
    report = _audit(backend, "app01")
    assert report.clean and report.lingering_bytes == 0


def test_audit_orphan_under_checkpoint_disk_is_blocked(backend):
    hv = backend("web01")
    tree, disks = hv.checkpoints("web01"), hv.vm_disks("web01")
    # a user checkpoint "late" owns mid.avhdx, the running leaf's parent; the orphan lies below it
    mid = WEB + "mid.avhdx"
    template = tree.checkpoints[1]
    late = dataclasses.replace(template, id="11111111-1111-4111-8111-111111111111", name="late",
                               disks=(dataclasses.replace(template.disks[0], path=mid),))
    chain = disks.chains[0]
    layers = chain.layers[:1] + (dataclasses.replace(chain.layers[1], path=mid),) + chain.layers[1:]
    tree2 = CheckpointTree(tree.vm, tree.checkpoints + (late,))
    disks2 = dataclasses.replace(disks, chains=(dataclasses.replace(chain, layers=layers),))
    report = audit_vm(tree2, disks2)
    blocked = [s for s in report.steps if s.mode == "blocked"]
    assert len(blocked) == 1
    assert blocked[0].commands == ("vhdx hyperv remove-checkpoint web01 late --wait",)


def test_checkpoint_kind_maps_snapshot_types():
    assert checkpoint_kind("Standard", 4 << 30) == "standard"
    assert checkpoint_kind("Standard", None) == "production"
    assert checkpoint_kind("Standard", 28672) == "production"
    assert checkpoint_kind("Recovery", None) == "recovery"
    assert checkpoint_kind("Planned", None) == "planned"
    assert checkpoint_kind("AppConsistentReplica", None) == "replica"
    assert checkpoint_kind("Missing", None) == "missing"


def test_checkpoint_tree_branches(backend):
    tree = backend("web01").checkpoints("web01")
    (root,) = tree.roots()
    assert root.name == "before-upgrade"
    assert [c.name for c in tree.children(root.id)] == ["test-branch", "patch-tuesday"]
    assert [c.kind for c in tree.checkpoints] == ["standard", "production", "production", "recovery"]
    assert tree.vm.parent_checkpoint_id == "b04aefb7-d19e-4a81-b789-25b8e3f6a91c"
