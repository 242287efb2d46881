"""Hyper-V backend: checkpoint trees, disk facts and online/offline merges of a Windows Hyper-V host.

Runs the host's own PowerShell module, locally (``powershell.exe`` on Windows) or remotely (PowerShell
Remoting through the optional ``pypsrp`` dependency, extra ``hyperv``). Importing this package never
needs pypsrp; only opening a ``PsrpTransport`` does.
"""

from __future__ import annotations

from vhdx.hyperv.audit import AuditReport, audit_vm
from vhdx.hyperv.backend import HyperV
from vhdx.hyperv.models import (
    Checkpoint,
    CheckpointTree,
    DiskRef,
    DiskTest,
    HyperVDiskInfo,
    JobStatus,
    MergeJob,
    MergeOutcome,
    MergeProgress,
    MergeResult,
    VmDisks,
    VmInfo,
    compare_disk_info,
)
from vhdx.hyperv.scripts import Script, ScriptCall
from vhdx.hyperv.transport import FakeTransport, LocalPowerShellTransport, PsrpTransport, Transport

__all__ = [
    "AuditReport",
    "Checkpoint",
    "CheckpointTree",
    "DiskRef",
    "DiskTest",
    "FakeTransport",
    "HyperV",
    "HyperVDiskInfo",
    "JobStatus",
    "LocalPowerShellTransport",
    "MergeJob",
    "MergeOutcome",
    "MergeProgress",
    "MergeResult",
    "PsrpTransport",
    "Script",
    "ScriptCall",
    "Transport",
    "VmDisks",
    "VmInfo",
    "audit_vm",
    "compare_disk_info",
]
