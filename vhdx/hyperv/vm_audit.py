"""Audit a VM folder offline: orphans, missing and broken disks, dirty logs, interrupted merges, and the plan.

The VM read from its folder is turned into the same ``CheckpointTree``/``VmDisks`` a live host reports, so
``audit_vm`` (shared with ``vhdx hyperv audit``) classifies the layers and builds the clean-up steps; this
module adds what only a folder shows (files no configuration reaches, missing files, broken chains) and the
numbers of each offline merge, from ``vhdx.merge_chain(..., dry_run=True)``: nothing is written.
"""

from __future__ import annotations

import dataclasses
import ntpath
import os
import shlex
from dataclasses import dataclass, field

import vhdx
from vhdx.errors import VhdxError
from vhdx.hyperv.audit import AuditReport, PlanStep, audit_vm, ps_quote, sh_quote
from vhdx.hyperv.models import (
    SAVED_STATE_MIN_BYTES,
    ChainLayer,
    Checkpoint,
    CheckpointTree,
    DiskChain,
    DiskRef,
    VmDisks,
    VmInfo,
)
from vhdx.hyperv.vm import ChainInfo, Folder, VirtualMachine, load_folder, search_dirs_for
from vhdx.ops.merge.journal import JOURNAL_SUFFIX

SNAPSHOT_TYPES = {"standard": "Standard", "production": "Standard", "recovery": "Recovery", "planned": "Planned",
                  "replica": "Replica"}


@dataclass
class FolderAudit:
    """What the audit of a VM folder found; ``to_json`` uses the names of ``vhdx vm audit --json``."""

    folder: Folder
    reports: list[AuditReport]
    orphans: list[dict] = field(default_factory=list)  # path, bytes, on_chain, parent, why
    missing: list[dict] = field(default_factory=list)  # owner, slot, path, tried
    broken: list[dict] = field(default_factory=list)  # owner, slot, path, error
    dirty: list[dict] = field(default_factory=list)  # path, what
    interrupted_merges: list[str] = field(default_factory=list)
    plan: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """2 when disks are missing or broken, 3 when only space is held by orphans or lingering layers, else 0."""
        if self.missing or self.broken or self.interrupted_merges:
            return 2
        return 3 if self.orphans or any(not r.clean for r in self.reports) else 0

    def to_json(self) -> dict:
        return {"root": self.folder.root, "vms": [v.to_json() for v in self.folder.vms],
                "orphans": self.orphans, "orphan_bytes": sum(o["bytes"] for o in self.orphans),
                "missing": self.missing, "broken": self.broken, "dirty": self.dirty,
                "interrupted_merges": self.interrupted_merges, "plan": self.plan, "warnings": self.warnings,
                "unreadable_configurations": [{"path": p, "error": e} for p, e in self.folder.unreadable],
                "layers": [r.to_json()["disks"] for r in self.reports]}


def _ref(drive) -> DiskRef:
    return DiskRef(drive.controller_type, drive.controller, drive.location, drive.local or drive.path)


def live_view(vm: VirtualMachine, chains: dict[str, ChainInfo]) -> tuple[CheckpointTree, VmDisks]:
    """The VM as ``vhdx hyperv`` sees a live one. State is "Off": offline changes need the VM off anyway."""
    names = {c.id: c.name for c in vm.checkpoints}
    info = VmInfo(vm.name, vm.id, "Off", None, vm.now_parent_id, os.path.dirname(vm.config_path),
                  tuple(_ref(d) for d in vm.drives if d.is_disk))
    checkpoints = tuple(
        Checkpoint(c.id, c.name, c.kind, SNAPSHOT_TYPES.get(c.kind, c.kind), c.parent_id, names.get(c.parent_id),
                   c.created.isoformat() if c.created else "", any(s.kind in ("vmrs", "bin") for s in c.state_files),
                   False, tuple(_ref(d) for d in c.drives if d.is_disk))
        for c in vm.checkpoints)
    disk_chains = []
    for d in vm.drives:
        if d.is_disk and d.local in chains:
            layers = tuple(ChainLayer(x["path"], x["disk_type"], x["file_size"], x["virtual_size"], x["parent"])
                           for x in chains[d.local].layers)
            disk_chains.append(DiskChain(_ref(d), layers))
    return CheckpointTree(info, checkpoints), VmDisks(info, tuple(disk_chains))


def _owners(vm: VirtualMachine):
    yield vm.name, vm.drives
    for c in vm.checkpoints:
        yield f"checkpoint {c.name!r}", c.drives


def audit_folder(path: str, search_dirs=()) -> FolderAudit:
    """Read the VM folder at ``path`` and audit it (read-only)."""
    folder = load_folder(path, search_dirs)
    reports = [_host_paths(audit_vm(*live_view(vm, folder.chains)), folder) for vm in folder.vms]
    result = FolderAudit(folder, reports)
    _record_drives(result, folder)
    _record_dirty_logs(result, folder)
    _record_orphans(result, folder, reports)
    result.interrupted_merges = sorted(p for name, paths in folder.index.by_name.items()
                                       if name.endswith(JOURNAL_SUFFIX) for p in paths)
    _record_saved_states(result, folder)
    result.plan = _plan(result, search_dirs_for(folder.index))
    return result


def _record_drives(result: FolderAudit, folder) -> None:
    """Missing and broken disks of every VM and checkpoint, and configurations whose replay log was replayed."""
    for vm in folder.vms:
        for owner, drives in _owners(vm):
            for d in drives:
                if not d.is_disk:
                    continue
                if d.local is None:
                    result.missing.append({"owner": owner, "slot": d.slot, "path": d.path, "tried": d.found_by})
                elif folder.chains[d.local].error:
                    result.broken.append({"owner": owner, "slot": d.slot, "path": d.local,
                                          "error": folder.chains[d.local].error})
            if vm.replayed_log_entries and owner == vm.name:
                result.dirty.append({"path": vm.config_path, "what": "configuration replay log (replayed in memory)"})
        for c in vm.checkpoints:
            if c.replayed_log_entries:
                result.dirty.append({"path": c.config_path, "what": "configuration replay log (replayed in memory)"})


def _record_dirty_logs(result: FolderAudit, folder) -> None:
    for chain in folder.chains.values():
        for x in chain.layers:
            if x["dirty_log"] and not any(d["path"] == x["path"] for d in result.dirty):
                result.dirty.append({"path": x["path"], "what": "VHDX log not yet replayed"})


def _record_orphans(result: FolderAudit, folder, reports) -> None:
    """Orphans in a running chain first, then disks in the folder that no configuration reaches."""
    for report in reports:
        for disk in report.disks:
            for layer in disk.layers:
                if layer.role == "orphan":
                    why = "in the running chain, but no configuration names it"
                    result.orphans.append({"path": layer.path, "bytes": layer.file_size, "on_chain": True,
                                           "parent": None, "why": why})
    reached = {os.path.realpath(x["path"]) for c in folder.chains.values() for x in c.layers}
    for disk in folder.index.disks():
        if os.path.realpath(disk) not in reached:
            result.orphans.append({"path": os.path.abspath(disk), "bytes": os.path.getsize(disk), "on_chain": False,
                                   "parent": _parent_of(disk), "why": "no configuration reaches it"})


def _record_saved_states(result: FolderAudit, folder) -> None:
    for vm in folder.vms:
        saved = sum(s.size for s in vm.state_files if s.kind in ("vmrs", "bin"))
        if saved >= SAVED_STATE_MIN_BYTES:
            # A saved VM's memory expects its disks as they are: never merge under it, and Stop-VM would discard it.
            result.warnings.append(
                f"VM {vm.name!r} is saved, not off ({saved} bytes of runtime state): start it and shut it down "
                "cleanly before any offline step")


def _parent_of(disk: str) -> str | None:
    try:
        with vhdx.open(disk, orphan=True) as image:
            locator = image.params.parent_locator if image.has_parent else None
            return locator.get("relative_path") or locator.get("absolute_win32_path") if locator else None
    except VhdxError as exc:
        return f"unreadable: {exc}"


def _plan(audit: FolderAudit, search_dirs) -> list[dict]:
    steps = []
    for report in audit.reports:
        for step in report.steps:
            entry = {"mode": step.mode, "title": step.title, "commands": list(step.commands),
                     "requires_vm_off": step.requires_vm_off, "note": step.note}
            if step.title.startswith("remove ") and "checkpoint" in step.title:
                entry["offline"] = ("nothing to do offline: the checkpoint's configuration (Snapshots\\<id>.vmcx) "
                                    "must be removed by Hyper-V, which also merges its disk; merging that disk "
                                    "offline would leave the checkpoint pointing at a file that no longer holds "
                                    "its state")
            merge = _parse_merge(step)
            if merge is not None:
                entry.update(_dry_run(merge, search_dirs))
                slot = step.title.split(": ", 1)[0]
                target = _windows_path(audit.folder, report.vm.id, slot, merge[1])
                entry["configuration_change"] = (
                    f"point drive {slot} of VM {report.vm.name!r} at {target} "
                    "(Set-VMHardDiskDrive as above, or in Hyper-V Manager); vhdx never edits a .vmcx")
            steps.append(entry)
    for o in audit.orphans:
        if not o["on_chain"]:
            steps.append({"mode": "offline", "title": f"{o['path']} is in no chain any configuration uses",
                          "commands": [f"vhdx chain {sh_quote(o['path'])}"], "requires_vm_off": False,
                          "note": f"Backup software leftover? Removing it frees {o['bytes']} bytes; nothing we "
                                  "read depends on it. vhdx does not delete it for you.",
                          "space_freed": o["bytes"]})
    return steps


def _host_paths(report: AuditReport, folder: Folder) -> AuditReport:
    """The plan as run from this folder.

    Each merge comes first as a dry run; Set-VMHardDiskDrive names the target as the host does (a Windows path).
    """
    steps = []
    for step in report.steps:
        merge = _parse_merge(step)
        if merge is not None:
            target = _windows_path(folder, report.vm.id, step.title.split(": ", 1)[0], merge[1])
            commands = []
            for c in step.commands:
                if c.startswith("vhdx merge "):
                    commands.append(c + " --dry-run")  # check first; the next line does it
                commands.append(c.replace(ps_quote(merge[1]), ps_quote(target))
                                if c.startswith("Set-VMHardDiskDrive") else c)
            step = dataclasses.replace(step, commands=tuple(commands))
        steps.append(step)
    return dataclasses.replace(report, steps=tuple(steps))


def _windows_path(folder: Folder, vm_id: str, slot: str, local: str) -> str:
    """``local`` as the host names it: in the folder of the path the drive's configuration holds."""
    vm = next((v for v in folder.vms if v.id == vm_id), None)
    drive = next((d for d in (vm.drives if vm else []) if d.slot == slot and d.is_disk), None)
    if drive is None:
        return local
    return ntpath.join(ntpath.dirname(drive.path), os.path.basename(local))


def _parse_merge(step: PlanStep) -> tuple[str, str] | None:
    for cmd in step.commands:
        if cmd.startswith("vhdx merge "):
            words = shlex.split(cmd)
            if "--into" in words:
                return words[2], words[words.index("--into") + 1]
            return words[2], ""
    return None


def _dry_run(merge: tuple[str, str], search_dirs) -> dict:
    child, target = merge
    try:
        result = vhdx.merge_chain(child, into=target or None, dry_run=True, search_dirs=search_dirs)
    except VhdxError as exc:
        return {"dry_run_error": str(exc)}
    plan = result.plan or {}
    merged_bytes = sum(os.path.getsize(p) for p in result.merged)
    needed = int(plan.get("new_bytes", 0) or 0)
    return {"dry_run": {"merged": list(result.merged), "destination": result.destination,
                        "bytes_to_copy": plan.get("bytes_to_copy"), "space_needed": needed,
                        "space_freed": merged_bytes - needed, "warnings": list(result.warnings)}}
