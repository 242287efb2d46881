"""The Hyper-V backend: what a host knows about VMs, checkpoints and disks, and the merges it can run.

``HyperV(transport)`` turns each request into one fixed script call (``vhdx.hyperv.scripts``), runs it, and
parses the JSON envelope into ``vhdx.hyperv.models``. Failures become ``vhdx.hyperv.errors.HyperVError``
subclasses carrying Hyper-V's own message and code.

Write-side requests come in pairs: ``plan_*`` returns the exact ``ScriptCall`` (for ``--dry-run``) and the
method of the same name runs it. Offline merges (``merge_offline``, Merge-VHD) need the chain detached;
online merges happen only through ``remove_checkpoint``, after which ``wait_for_merge`` follows Hyper-V's
jobs and the VM's chains until the merged files are gone.

References: HYPERV-NOTES §1.3 (Merge-VHD), §1.4 (Set-VHD), §1.7 (Remove-VMSnapshot), §2.3 (job polling),
§4.1 (live merge), §5.3 (timeouts and back-off).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from vhdx.hyperv import scripts
from vhdx.hyperv.errors import (
    CheckpointNotFoundError,
    HyperVAccessDeniedError,
    HyperVError,
    HyperVJobFailedError,
    HyperVTimeoutError,
    HyperVUnavailableError,
    VmNotFoundError,
)
from vhdx.hyperv.models import (
    CheckpointTree,
    DiskProblem,
    DiskTest,
    HyperVDiskInfo,
    MergeJob,
    MergeOutcome,
    MergeProgress,
    MergeResult,
    VmDisks,
    VmInfo,
    as_list,
    same_path,
)
from vhdx.hyperv.scripts import ScriptCall
from vhdx.hyperv.transport import Transport

# .NET's generic HRESULTs say nothing about the cause; a code quoted in Hyper-V's message is better.
_GENERIC_HRESULTS = {-2146233087, -2146233079, -2146232832, -2146233088}  # 0x80131501, 0x80131509, ...
_CODE_IN_TEXT = re.compile(r"(?:\(|error code:?\s*'?)(0x[0-9A-Fa-f]{8})", re.IGNORECASE)
_ACCESS_DENIED_HRESULT = -2147024891  # 0x80070005
_ACCESS_DENIED_WMI = 32769


def _error_code(error: dict) -> int | None:
    match = _CODE_IN_TEXT.search(error.get("message") or "")
    if match:
        return int(match.group(1), 16)
    hresult = error.get("hresult")
    if hresult in (None, "") or int(hresult) in _GENERIC_HRESULTS:
        return None
    return int(hresult) & 0xFFFFFFFF


def error_from_envelope(error: dict, script: scripts.Script) -> HyperVError:
    """Map the script's error record onto the HyperVError tree (Hyper-V's text and code kept)."""
    kind = error.get("kind") or ""
    message = " ".join(str(error.get("message") or "unknown error").split())
    category = error.get("category") or None
    error_id = error.get("error_id") or None
    code = _error_code(error)
    kw = {"command": script.name, "code": code, "category": category, "error_id": error_id}
    exception = error.get("exception") or ""
    lowered = message.lower()
    if kind == "ModuleMissing" or ((error_id or "").startswith("CommandNotFoundException") and "hyper-v\\" in lowered):
        return HyperVUnavailableError(message, **kw)
    if kind in ("VmNotFound", "VmAmbiguous"):
        return VmNotFoundError(message, **kw)
    if kind in ("CheckpointNotFound", "CheckpointAmbiguous"):
        return CheckpointNotFoundError(message, **kw)
    if (category == "PermissionDenied" or exception.endswith("UnauthorizedAccessException")
            or code in (_ACCESS_DENIED_HRESULT & 0xFFFFFFFF, _ACCESS_DENIED_WMI)
            or "required permission" in lowered or "access is denied" in lowered):
        return HyperVAccessDeniedError(message, **kw)
    if script.mutating and not kind:
        return HyperVJobFailedError(message, **kw)
    return HyperVError(message, **kw)


ProgressCallback = Callable[[MergeProgress], None]


class HyperV:
    """One Hyper-V host reached through ``transport``.

    Args:
        transport: how scripts reach the host (``LocalPowerShellTransport``, ``PsrpTransport``, ``FakeTransport``).
        query_timeout_s: limit for each single request, in seconds.
        clock, sleep: injectable for tests of ``wait_for_merge``.
    """

    def __init__(self, transport: Transport, *, query_timeout_s: float = 60.0,
                 clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None) -> None:
        self.transport = transport
        self.query_timeout_s = query_timeout_s
        self.clock = clock or time.monotonic
        self.sleep = sleep or time.sleep

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> HyperV:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, call: ScriptCall, timeout_s: float | None = None):
        """Run one call; return its ``data`` or raise the mapped HyperVError."""
        envelope = self.transport.run(call, timeout_s if timeout_s is not None else self.query_timeout_s)
        if envelope.get("ok"):
            return envelope.get("data")
        return self._raise(envelope.get("error") or {}, call.script)

    @staticmethod
    def _raise(error: dict, script: scripts.Script):
        raise error_from_envelope(error, script)

    # -- read side -------------------------------------------------------------------------------------------

    def list_vms(self) -> list[VmInfo]:
        return [VmInfo.from_json(d) for d in as_list(self.run(ScriptCall(scripts.LIST_VMS, {})))]

    def checkpoints(self, vm: str) -> CheckpointTree:
        return CheckpointTree.from_json(self.run(ScriptCall(scripts.GET_CHECKPOINTS, {"VMName": vm})))

    def vm_disks(self, vm: str) -> VmDisks:
        """The chain each drive of ``vm`` runs on (Get-VHD walk) and Hyper-V's merge jobs for the VM."""
        return VmDisks.from_json(self.run(ScriptCall(scripts.GET_VM_DISKS, {"VMName": vm})))

    def disk_info(self, path: str) -> HyperVDiskInfo:
        return HyperVDiskInfo.from_json(self.run(ScriptCall(scripts.GET_VHD, {"Path": path})))

    def test_disk(self, path: str) -> DiskTest:
        data = self.run(ScriptCall(scripts.TEST_VHD, {"Path": path}))
        problems = []
        for p in as_list(data.get("Problems")):
            code = _error_code(p)
            if p.get("category") == "PermissionDenied" or code == _ACCESS_DENIED_HRESULT & 0xFFFFFFFF:
                raise HyperVAccessDeniedError(str(p.get("message")), command=scripts.TEST_VHD.name, code=code)
            problems.append(DiskProblem(" ".join(str(p.get("message") or "").split()), p.get("error_id") or None,
                                        p.get("category") or None, code))
        return DiskTest(str(data.get("Path") or path), bool(data.get("Passed")), tuple(problems))

    # -- write side: plan_* gives the exact call, the method runs it --------------------------------------------

    @staticmethod
    def plan_merge_offline(child: str, into: str | None = None) -> ScriptCall:
        return ScriptCall(scripts.MERGE_VHD, {"Path": child, "DestinationPath": into})

    def merge_offline(self, child: str, into: str | None = None, *, timeout_s: float | None = None) -> MergeResult:
        """Merge-VHD: fold ``child`` (and every layer between) into ``into`` (default: its parent); offline only."""
        data = self.run(self.plan_merge_offline(child, into), timeout_s)
        return MergeResult(str(data["Source"]), bool(data.get("SourceStillExists")),
                           HyperVDiskInfo.from_json(data["Destination"]))

    @staticmethod
    def plan_set_parent(child: str, parent: str, *, leaf: str | None = None,
                        ignore_id_mismatch: bool = False) -> ScriptCall:
        return ScriptCall(scripts.SET_VHD_PARENT, {"Path": child, "ParentPath": parent, "LeafPath": leaf,
                                                   "IgnoreIdMismatch": True if ignore_id_mismatch else None})

    def set_parent(self, child: str, parent: str, *, leaf: str | None = None,
                   ignore_id_mismatch: bool = False) -> HyperVDiskInfo:
        """Set-VHD -ParentPath (``leaf`` is required by Hyper-V when the chain is in use)."""
        return HyperVDiskInfo.from_json(self.run(self.plan_set_parent(child, parent, leaf=leaf,
                                                                      ignore_id_mismatch=ignore_id_mismatch)))

    @staticmethod
    def plan_remove_checkpoint(vm: str, checkpoint: str, *, subtree: bool = False) -> ScriptCall:
        return ScriptCall(scripts.REMOVE_CHECKPOINT, {"VMName": vm, "Name": checkpoint,
                                                      "IncludeAllChildSnapshots": True if subtree else None})

    def remove_checkpoint(self, vm: str, checkpoint: str, *, subtree: bool = False) -> MergeJob:
        """Remove-VMCheckpoint: Hyper-V merges the checkpoint's differencing disks (live if the VM runs).

        Before removing, reads the tree and the VM's chains to know which files the merge should take away
        (see ``MergeJob.expect_gone``) and which jobs already existed.
        """
        tree = self.checkpoints(vm)
        matches = tree.find(checkpoint)
        if not matches:
            raise CheckpointNotFoundError(f"no checkpoint is named {checkpoint}", command=scripts.GET_CHECKPOINTS.name)
        if len(matches) > 1:
            raise CheckpointNotFoundError(f"{len(matches)} checkpoints are named {checkpoint}; rename one first",
                                          command=scripts.GET_CHECKPOINTS.name)
        removed = tree.subtree(matches[0]) if subtree else [matches[0]]
        disks = self.vm_disks(vm)
        expect_gone = []
        for chain in disks.chains:
            for c in removed:
                for ref in c.disks:
                    for layer in chain.layers:
                        if same_path(layer.parent_path, ref.path) and not any(same_path(layer.path, g)
                                                                              for g in expect_gone):
                            expect_gone.append(layer.path)
        self.run(self.plan_remove_checkpoint(vm, checkpoint, subtree=subtree))
        return MergeJob(vm, tuple(c.name for c in removed), tuple(expect_gone),
                        tuple(j.instance_id for j in disks.jobs))

    def wait_for_merge(self, vm: str, timeout_s: float | None = None, *, job: MergeJob | None = None,
                       progress: ProgressCallback | None = None, poll_interval_s: float = 0.5,
                       max_interval_s: float = 10.0) -> MergeOutcome:
        """Follow Hyper-V's merge of ``vm`` until done, reporting progress.

        Done means: no merge or checkpoint-deletion job of the VM is still active, and none of the files in
        ``job.expect_gone`` is still part of a chain the VM runs on. A job that ends in failure raises
        ``HyperVJobFailedError`` with Hyper-V's text and code; ``timeout_s`` (None: no limit) raises
        ``HyperVTimeoutError`` naming what is left. Polls back off from ``poll_interval_s`` to ``max_interval_s``.
        """
        start = self.clock()
        ignored = set(job.jobs_before) if job else set()
        expected = list(job.expect_gone) if job else []
        first: VmDisks | None = None
        interval = poll_interval_s
        while True:
            status = self.vm_disks(vm)
            first = first or status
            jobs = [j for j in status.jobs if j.instance_id not in ignored]
            for j in jobs:
                if j.failed:
                    raise HyperVJobFailedError(
                        f"{j.caption or 'Hyper-V job'} {j.state_name}: {j.error_description or 'no description'}",
                        command="merge job", code=j.error_code)
            active = tuple(j for j in jobs if j.active)
            remaining = tuple(p for p in expected if status.references(p))
            elapsed = self.clock() - start
            percent = min((j.percent_complete for j in active), default=None)
            if progress is not None:
                progress(MergeProgress(round(elapsed, 3), percent, active, remaining))
            if not active and not remaining:
                before = [p for chain in first.chains for p in chain.paths]
                merged = tuple(p for p in before + expected if not status.references(p))
                return MergeOutcome(vm, round(elapsed, 3), tuple(dict.fromkeys(merged)), status.chains)
            if timeout_s is not None and elapsed + interval > timeout_s:
                left = ", ".join(remaining) or "no file; a job is still active"
                pct = f" at {percent} %" if percent is not None else ""
                raise HyperVTimeoutError(f"merge of {vm} not finished after {timeout_s:g} s{pct}; still in use: {left}",
                                         command="merge job")
            self.sleep(interval)
            interval = min(interval * 2, max_interval_s)
