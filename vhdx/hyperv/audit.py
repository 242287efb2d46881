"""Lingering differencing disks: which layers of a VM's chains no checkpoint explains, and how to fold them.

Backup software creates Recovery checkpoints and, after a failed job, can leave them (or bare ``.avhdx``
files whose checkpoint is gone) behind; the VM then runs on an ever longer chain. ``audit_vm`` classifies
every layer of every drive's chain and builds the plan that removes the lingering ones:

* a layer owned by a Recovery checkpoint goes away **online** by removing that checkpoint (Hyper-V merges
  it live; this also works while the VM is off and keeps the VM configuration consistent);
* a layer no checkpoint owns (orphaned ``.avhdx``) cannot be merged by Hyper-V online; with the VM off, our
  engine merges the running leaf down into the lowest layer that may change (``vhdx merge LEAF --into
  TARGET``) and the drive is pointed at TARGET;
* orphans sitting under a checkpoint's disk cannot be folded without changing that checkpoint: the plan
  says which checkpoints must go first.

Pure functions over ``CheckpointTree`` and ``VmDisks``; nothing here talks to a host.

References: HYPERV-NOTES §2.2 (recovery snapshots), §3.5 (Microsoft's orphaned-AVHDX procedure), §4.1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vhdx.hyperv.models import Checkpoint, CheckpointTree, DiskChain, DiskRef, VmDisks, VmInfo, same_path

LINGERING_KINDS = ("recovery",)


def ps_quote(text: str) -> str:
    """A PowerShell single-quoted literal, for commands printed for a human to run (never run by us)."""
    return "'" + str(text).replace("'", "''").replace("\u2018", "\u2018\u2018").replace("\u2019", "\u2019\u2019") + "'"


def sh_quote(text: str) -> str:
    """A shell word for ``vhdx`` commands printed in a plan."""
    text = str(text)
    if text and all(ch.isalnum() or ch in "-_./:\\" for ch in text):
        return text
    return "'" + text.replace("'", "'\"'\"'") + "'"


@dataclass(frozen=True)
class AuditLayer:
    path: str
    disk_type: str
    file_size: int
    role: str  # running | checkpoint | recovery | orphan | base
    checkpoints: tuple[str, ...] = ()  # names of the checkpoints whose disk this file is


@dataclass(frozen=True)
class PlanStep:
    mode: str  # online | offline | blocked
    title: str
    commands: tuple[str, ...]
    requires_vm_off: bool = False
    note: str | None = None


@dataclass(frozen=True)
class DiskAudit:
    drive: DiskRef
    layers: tuple[AuditLayer, ...]  # leaf (running) first, base last
    stray_files: tuple[tuple[str, int], ...] = ()  # .avhdx next to the base that no chain uses

    @property
    def lingering(self) -> tuple[AuditLayer, ...]:
        return tuple(layer for layer in self.layers if layer.role in ("recovery", "orphan"))


@dataclass(frozen=True)
class AuditReport:
    vm: VmInfo
    disks: tuple[DiskAudit, ...]
    recovery_checkpoints: tuple[Checkpoint, ...]
    steps: tuple[PlanStep, ...]
    merge_in_progress: bool = False

    @property
    def lingering_bytes(self) -> int:
        return sum(layer.file_size for d in self.disks for layer in d.lingering)

    @property
    def clean(self) -> bool:
        return not self.steps

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["lingering_bytes"] = self.lingering_bytes
        return data


def _owners(tree: CheckpointTree, path: str) -> list[Checkpoint]:
    return [c for c in tree.checkpoints if any(same_path(ref.path, path) for ref in c.disks)]


def _classify(chain: DiskChain, tree: CheckpointTree) -> list[AuditLayer]:
    layers = []
    for index, layer in enumerate(chain.layers):
        owners = _owners(tree, layer.path)
        if index == 0:
            role = "running"
        elif owners:
            role = "recovery" if all(c.kind in LINGERING_KINDS for c in owners) else "checkpoint"
        elif layer.disk_type == "differencing":
            role = "orphan"
        else:
            role = "base"
        layers.append(AuditLayer(layer.path, layer.disk_type, layer.file_size, role, tuple(c.name for c in owners)))
    return layers


def _orphan_step(vm: VmInfo, chain: DiskChain, layers: list[AuditLayer], tree: CheckpointTree) -> PlanStep | None:
    """Plan for the orphaned layers of one chain (layers are leaf first)."""
    orphan_idx = [i for i, layer in enumerate(layers) if layer.role == "orphan"]
    if not orphan_idx:
        return None
    leaf = layers[0]
    names = ", ".join(layers[i].path for i in orphan_idx)
    # Orphans directly under the running leaf (a contiguous run starting at index 1) can be folded offline.
    run_end = 1
    while run_end < len(layers) and layers[run_end].role == "orphan":
        run_end += 1
    if run_end == 1:
        above = [layers[i] for i in range(1, orphan_idx[0]) if layers[i].role in ("checkpoint", "recovery")]
        blockers = [name for layer in above for name in layer.checkpoints]
        return PlanStep(
            "blocked", f"{chain.drive.slot}: orphaned layers sit under checkpoint disks",
            tuple(f"vhdx hyperv remove-checkpoint {sh_quote(vm.name)} {sh_quote(n)} --wait" for n in blockers),
            note=(f"{names} belong to no checkpoint but lie beneath the disks of {', '.join(blockers)}; merging "
                  "them would change those checkpoints. Removing those checkpoints first (online) brings the "
                  "orphans under the running disk; then run the audit again."))
    names = ", ".join(layer.path for layer in layers[1:run_end])
    below = layers[run_end] if run_end < len(layers) else None
    # The lowest orphan always may change; the layer below the run only if nothing references it.
    target = below if below is not None and below.role == "base" else layers[run_end - 1]
    commands = [] if vm.is_off else [f"Stop-VM -Name {ps_quote(vm.name)}"]
    commands.append(f"vhdx merge {sh_quote(leaf.path)} --into {sh_quote(target.path)}")
    drive = chain.drive
    commands.append(f"Set-VMHardDiskDrive -VMName {ps_quote(vm.name)} -ControllerType {drive.controller_type} "
                    f"-ControllerNumber {drive.controller_number} -ControllerLocation {drive.controller_location} "
                    f"-Path {ps_quote(target.path)}")
    if not vm.is_off:
        commands.append(f"Start-VM -Name {ps_quote(vm.name)}")
    return PlanStep(
        "offline", f"{chain.drive.slot}: fold orphaned {names} with our engine while the VM is off",
        tuple(commands), requires_vm_off=True,
        note=("No checkpoint owns these files, so Hyper-V will not merge them online. The merge writes the "
              f"running disk's data into {target.path}, which the drive then uses; the files above it are removed "
              "by the merge."))


def audit_vm(tree: CheckpointTree, disks: VmDisks) -> AuditReport:
    """Classify each layer of each drive's chain and build the clean-up plan."""
    vm = disks.vm
    audits, offline_steps = [], []
    for chain in disks.chains:
        layers = _classify(chain, tree)
        stray = tuple((p, size) for p, size in chain.folder_avhdx if not any(c.references(p) for c in disks.chains)
                      and not _owners(tree, p))
        audits.append(DiskAudit(chain.drive, tuple(layers), stray))
        step = _orphan_step(vm, chain, layers, tree)
        if step is not None:
            offline_steps.append(step)
    recovery = tuple(c for c in tree.checkpoints if c.kind in LINGERING_KINDS)
    online_steps = [
        PlanStep("online", f"remove {c.kind} checkpoint {c.name!r} (Hyper-V merges its disks live)",
                 (f"vhdx hyperv remove-checkpoint {sh_quote(vm.name)} {sh_quote(c.name)} --wait",),
                 note="Hyper-V hides Recovery checkpoints in its manager; they still hold .avhdx files.")
        for c in recovery if not any(c.id == o.parent_id for o in recovery)  # the topmost of nested ones
    ]
    steps = list(online_steps)
    if online_steps and offline_steps:
        steps.append(PlanStep("online", "re-run the audit after the checkpoint removals: the chains change",
                              (f"vhdx hyperv audit {sh_quote(vm.name)}",),
                              note="Do the offline steps below only for what the new audit still reports."))
    steps += offline_steps
    for d in audits:
        for path, _size in d.stray_files:
            steps.append(PlanStep("offline", f"stray file {path} is in no chain and no checkpoint",
                                  (f"vhdx chain {sh_quote(path)}",),
                                  note="Check what it belongs to; delete it only when nothing references it."))
    return AuditReport(vm, tuple(audits), recovery, tuple(steps), any(j.active for j in disks.jobs))
