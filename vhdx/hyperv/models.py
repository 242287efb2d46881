"""Plain data the Hyper-V backend returns: VMs, checkpoints, disks, jobs (frozen dataclasses, JSON-ready).

Parsing of the scripts' JSON happens here and only here (``*_from_json``), so the rules for PowerShell's
output quirks live in one place: enums arrive as strings or integers, single objects or arrays, empty strings
for "no value", GUIDs in upper case.

References: HYPERV-NOTES §1.1 (Get-VHD fields), §1.6 (Get-VMSnapshot fields, SnapshotType values), §1.9
(Get-VMHardDiskDrive), §2.3 (Msvm_ConcreteJob JobState/JobType), §4.3 (standard vs production).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field

from vhdx.ops.inspect import DiskInfo

# VhdType / VhdFormat as WMI numbers (Msvm_VirtualHardDiskSettingData Type/Format), for hosts that emit ints.
VHD_TYPE_NAMES = {2: "fixed", 3: "dynamic", 4: "differencing"}
VHD_FORMAT_NAMES = {2: "vhd", 3: "vhdx", 4: "vhdset"}

# Checkpoint kinds as we show them. Hyper-V reports SnapshotType; "standard" and "production" both report
# Standard and are told apart by saved memory state (see checkpoint_kind).
SNAPSHOT_TYPE_KINDS = {
    "recovery": "recovery",
    "planned": "planned",
    "missing": "missing",
    "replica": "replica",
    "appconsistentreplica": "replica",
    "syncedreplica": "replica",
}
# A standard checkpoint of a running VM saves the guest memory; anything below this is a placeholder file.
SAVED_STATE_MIN_BYTES = 1 << 20

# Msvm_ConcreteJob.JobState (CIM): 7 Completed, 32768 completed with warnings (vendor), 8/9/10 failures.
JOB_STATES = {2: "new", 3: "starting", 4: "running", 5: "suspended", 6: "shutting down", 7: "completed",
              8: "terminated", 9: "killed", 10: "exception", 11: "service", 32768: "completed with warnings"}
JOB_ACTIVE_STATES = frozenset({2, 3, 4, 5, 6, 11})
JOB_FAILED_STATES = frozenset({8, 9, 10})
JOB_TYPES = {50: "merging disks", 72: "deleting checkpoint"}


def _text(value) -> str | None:
    """PowerShell's "no value" comes as null or "": both become None."""
    if value is None:
        return None
    text = str(value)
    return text if text.strip() else None


def _int(value, default: int = 0) -> int:
    return default if value is None or value == "" else int(value)


def _guid(value) -> str | None:
    text = _text(value)
    if text is None:
        return None
    try:
        return str(uuid.UUID(text.strip("{}")))
    except ValueError:
        return text


def as_list(value) -> list:
    """ConvertTo-Json writes one object as an object and several as an array; always give a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _enum_name(value, numbers: dict[int, str]) -> str:
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return numbers.get(int(value), f"unknown({value})")
    return str(value).lower() if value is not None else "unknown"


def same_path(a: str | None, b: str | None) -> bool:
    """Windows paths compare without regard to case or slash direction."""
    if a is None or b is None:
        return a is b
    return a.replace("/", "\\").rstrip("\\").casefold() == b.replace("/", "\\").rstrip("\\").casefold()


class _Json:
    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DiskRef(_Json):
    """A virtual hard disk drive of a VM or of a checkpoint: where it sits and which file it uses."""

    controller_type: str
    controller_number: int
    controller_location: int
    path: str | None

    @property
    def slot(self) -> str:
        return f"{self.controller_type} {self.controller_number}:{self.controller_location}"

    @classmethod
    def from_json(cls, d: dict) -> DiskRef:
        return cls(str(d.get("ControllerType") or "?"), _int(d.get("ControllerNumber")),
                   _int(d.get("ControllerLocation")), _text(d.get("Path")))


@dataclass(frozen=True)
class VmInfo(_Json):
    name: str
    id: str
    state: str
    checkpoint_type: str | None
    parent_checkpoint_id: str | None
    path: str | None
    disks: tuple[DiskRef, ...] = ()

    @property
    def is_off(self) -> bool:
        return self.state.lower() in ("off", "offcritical")

    @classmethod
    def from_json(cls, d: dict) -> VmInfo:
        return cls(name=str(d["Name"]), id=_guid(d.get("Id")) or "", state=str(d.get("State") or "Unknown"),
                   checkpoint_type=_text(d.get("CheckpointType")),
                   parent_checkpoint_id=_guid(d.get("ParentCheckpointId")), path=_text(d.get("Path")),
                   disks=tuple(DiskRef.from_json(x) for x in as_list(d.get("HardDrives"))))


def checkpoint_kind(snapshot_type, runtime_state_bytes: int | None) -> str:
    r"""Kind of a checkpoint: standard, production, recovery, planned, replica or missing.

    Hyper-V reports SnapshotType Standard for both user kinds. A standard checkpoint of a running VM keeps
    the memory state in ``Snapshots\\<id>.vmrs``; a production one (VSS / fsfreeze) has none. A standard
    checkpoint of a VM that was off has none either and is shown as production: no documented field tells
    them apart.
    """
    name = str(snapshot_type or "").replace(" ", "").lower()
    if name in SNAPSHOT_TYPE_KINDS:
        return SNAPSHOT_TYPE_KINDS[name]
    if name != "standard":
        return f"unknown({snapshot_type})"
    return "standard" if (runtime_state_bytes or 0) >= SAVED_STATE_MIN_BYTES else "production"


@dataclass(frozen=True)
class Checkpoint(_Json):
    id: str
    name: str
    kind: str  # standard | production | recovery | planned | replica | missing
    snapshot_type: str  # as Hyper-V reports it
    parent_id: str | None
    parent_name: str | None
    creation_time: str
    has_saved_state: bool
    is_automatic: bool
    disks: tuple[DiskRef, ...] = ()

    @classmethod
    def from_json(cls, d: dict) -> Checkpoint:
        runtime = d.get("RuntimeStateBytes")
        runtime = None if runtime in (None, "") else int(runtime)
        return cls(id=_guid(d.get("Id")) or "", name=str(d.get("Name") or ""),
                   kind=checkpoint_kind(d.get("SnapshotType"), runtime),
                   snapshot_type=str(d.get("SnapshotType") or ""), parent_id=_guid(d.get("ParentCheckpointId")),
                   parent_name=_text(d.get("ParentCheckpointName")), creation_time=str(d.get("CreationTime") or ""),
                   has_saved_state=(runtime or 0) >= SAVED_STATE_MIN_BYTES,
                   is_automatic=bool(d.get("IsAutomaticCheckpoint")),
                   disks=tuple(DiskRef.from_json(x) for x in as_list(d.get("HardDrives"))))


@dataclass(frozen=True)
class CheckpointTree(_Json):
    """A VM's checkpoints; ``vm.parent_checkpoint_id`` is where the running state hangs ("Now")."""

    vm: VmInfo
    checkpoints: tuple[Checkpoint, ...]

    def children(self, parent_id: str | None) -> list[Checkpoint]:
        known = {c.id for c in self.checkpoints}
        kids = [c for c in self.checkpoints
                if c.parent_id == parent_id or (parent_id is None and c.parent_id not in known)]
        return sorted(kids, key=lambda c: (c.creation_time, c.name))

    def roots(self) -> list[Checkpoint]:
        return self.children(None)

    def find(self, name: str) -> list[Checkpoint]:
        return [c for c in self.checkpoints if c.name == name]

    def subtree(self, checkpoint: Checkpoint) -> list[Checkpoint]:
        out, todo = [], [checkpoint]
        while todo:
            node = todo.pop()
            out.append(node)
            todo.extend(self.children(node.id))
        return out

    @classmethod
    def from_json(cls, d: dict) -> CheckpointTree:
        return cls(VmInfo.from_json(d["VM"]), tuple(Checkpoint.from_json(x) for x in as_list(d.get("Checkpoints"))))


@dataclass(frozen=True)
class HyperVDiskInfo(_Json):
    """Get-VHD's view of one file; the first ten fields are those of ``vhdx.ops.inspect.DiskInfo``."""

    path: str
    format: str
    disk_type: str
    virtual_size: int
    file_size: int
    block_size: int
    logical_sector_size: int
    physical_sector_size: int
    disk_id: str
    parent_path: str | None
    minimum_size: int | None = None
    fragmentation_percentage: int | None = None
    alignment: int | None = None
    attached: bool = False
    disk_number: int | None = None

    def to_disk_info(self) -> DiskInfo:
        names = [f.name for f in dataclasses.fields(DiskInfo)]
        return DiskInfo(**{n: getattr(self, n) for n in names})

    @classmethod
    def from_json(cls, d: dict) -> HyperVDiskInfo:
        minimum = d.get("MinimumSize")
        return cls(
            path=str(d["Path"]), format=_enum_name(d.get("VhdFormat"), VHD_FORMAT_NAMES),
            disk_type=_enum_name(d.get("VhdType"), VHD_TYPE_NAMES), virtual_size=_int(d.get("Size")),
            file_size=_int(d.get("FileSize")), block_size=_int(d.get("BlockSize")),
            logical_sector_size=_int(d.get("LogicalSectorSize")),
            physical_sector_size=_int(d.get("PhysicalSectorSize")), disk_id=_guid(d.get("DiskIdentifier")) or "",
            parent_path=_text(d.get("ParentPath")), minimum_size=None if minimum in (None, "") else int(minimum),
            fragmentation_percentage=None if d.get("FragmentationPercentage") is None
            else int(d["FragmentationPercentage"]),
            alignment=None if d.get("Alignment") is None else int(d["Alignment"]),
            attached=bool(d.get("Attached")),
            disk_number=None if d.get("DiskNumber") in (None, "") else int(d["DiskNumber"]))


@dataclass(frozen=True)
class FieldDifference(_Json):
    field: str
    hyperv: object
    ours: object


# Fields compared by ``compare_disk_info``. path is left out: the two readers see the same file under
# different names (host path vs SMB path or local copy).
COMPARED_FIELDS = ("format", "disk_type", "virtual_size", "file_size", "block_size", "logical_sector_size",
                   "physical_sector_size", "disk_id", "parent_path")


def compare_disk_info(hyperv: DiskInfo, ours: DiskInfo) -> list[FieldDifference]:
    """Fields where Hyper-V and our parser disagree (paths compared as Windows paths, ids as GUIDs)."""
    diffs = []
    for name in COMPARED_FIELDS:
        a, b = getattr(hyperv, name), getattr(ours, name)
        if name == "block_size" and hyperv.disk_type == "fixed" and a == 0:
            continue  # Get-VHD shows BlockSize 0 for fixed disks; the file still records one
        if name == "parent_path":
            equal = same_path(a, b)
        elif isinstance(a, str) and isinstance(b, str):
            equal = a.casefold() == b.casefold()
        else:
            equal = a == b
        if not equal:
            diffs.append(FieldDifference(name, a, b))
    return diffs


@dataclass(frozen=True)
class DiskProblem(_Json):
    message: str
    error_id: str | None
    category: str | None
    code: int | None


@dataclass(frozen=True)
class DiskTest(_Json):
    """Test-VHD's verdict on a disk (a differencing disk is tested with its whole chain)."""

    path: str
    passed: bool
    problems: tuple[DiskProblem, ...] = ()


@dataclass(frozen=True)
class MergeResult(_Json):
    """Merge-VHD (offline) done: the destination as it is now; whether the merged source file remains."""

    source: str
    source_still_exists: bool
    destination: HyperVDiskInfo


@dataclass(frozen=True)
class JobStatus(_Json):
    instance_id: str
    job_type: int
    state: int
    percent_complete: int
    error_code: int
    error_description: str | None
    caption: str | None = None

    @property
    def state_name(self) -> str:
        return JOB_STATES.get(self.state, f"state {self.state}")

    @property
    def active(self) -> bool:
        return self.state in JOB_ACTIVE_STATES

    @property
    def failed(self) -> bool:
        return self.state in JOB_FAILED_STATES or (not self.active and self.error_code not in (0, None))

    @classmethod
    def from_json(cls, d: dict) -> JobStatus:
        description = _text(d.get("ErrorDescription")) or _text(d.get("ErrorSummaryDescription"))
        return cls(str(d.get("InstanceID") or ""), _int(d.get("JobType")), _int(d.get("JobState")),
                   _int(d.get("PercentComplete")), _int(d.get("ErrorCode")), description, _text(d.get("Caption")))


@dataclass(frozen=True)
class ChainLayer(_Json):
    """One file of a disk chain as Get-VHD sees it."""

    path: str
    disk_type: str
    file_size: int
    virtual_size: int
    parent_path: str | None


@dataclass(frozen=True)
class DiskChain(_Json):
    """A VM drive and the chain it runs on, leaf (what the VM writes to) first."""

    drive: DiskRef
    layers: tuple[ChainLayer, ...]
    folder_avhdx: tuple[tuple[str, int], ...] = ()  # .avhdx files named after the base disk, with sizes

    @property
    def paths(self) -> list[str]:
        return [layer.path for layer in self.layers]

    def references(self, path: str) -> bool:
        return any(same_path(path, p) for p in self.paths)

    @classmethod
    def from_json(cls, d: dict) -> DiskChain:
        layers = []
        for x in as_list(d.get("Chain")):
            info = HyperVDiskInfo.from_json(x)
            layers.append(ChainLayer(info.path, info.disk_type, info.file_size, info.virtual_size, info.parent_path))
        folder = tuple((str(f["Path"]), _int(f.get("Length"))) for f in as_list(d.get("FolderAvhdx")))
        return cls(DiskRef.from_json(d.get("Drive") or {}), tuple(layers), folder)


@dataclass(frozen=True)
class VmDisks(_Json):
    """A VM, the chains its drives run on, and the merge / checkpoint-deletion jobs Hyper-V reports for it."""

    vm: VmInfo
    chains: tuple[DiskChain, ...]
    jobs: tuple[JobStatus, ...] = ()

    def references(self, path: str) -> bool:
        return any(chain.references(path) for chain in self.chains)

    @classmethod
    def from_json(cls, d: dict) -> VmDisks:
        return cls(VmInfo.from_json(d["VM"]), tuple(DiskChain.from_json(x) for x in as_list(d.get("Disks"))),
                   tuple(JobStatus.from_json(x) for x in as_list(d.get("Jobs"))))


@dataclass(frozen=True)
class MergeJob(_Json):
    """What ``remove_checkpoint`` started: the removed checkpoints and the files expected to be merged away.

    ``expect_gone`` holds, for each drive whose chain passes through a removed checkpoint's disk, the layer
    just above that disk (the differencing disk created when the checkpoint was taken), which Hyper-V folds
    into it. Files in other branches of the tree are not in the running chain and cannot be followed.
    """

    vm: str
    removed: tuple[str, ...]  # checkpoint names
    expect_gone: tuple[str, ...]
    jobs_before: tuple[str, ...] = ()  # InstanceIDs of jobs that existed before (ignored when following)


@dataclass(frozen=True)
class MergeProgress(_Json):
    elapsed_s: float
    percent: int | None  # lowest PercentComplete of the active jobs, None when no job is visible
    active_jobs: tuple[JobStatus, ...]
    remaining: tuple[str, ...]  # expected-gone files the VM still references


@dataclass(frozen=True)
class MergeOutcome(_Json):
    vm: str
    elapsed_s: float
    merged: tuple[str, ...]  # files the VM's chains referenced before and no longer do
    chains: tuple[DiskChain, ...] = field(default_factory=tuple)
