"""The header-only probe of one file: a small, cheaply pickled record of what the file says about itself.

A disk probe reads the file identifier, both headers, the log header state, both region tables and the
metadata (parent locator included), never the BAT unless a full check is asked for. Whatever goes wrong with
one file (unreadable, not a VHDX, vanished while the scan ran) becomes that file's result, never an exception:
a fleet scan must finish and report every disk.

References: [MS-VHDX] §2.2 (headers), §2.3 (log), §2.6.2.6 (parent locator).
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass, field, replace

from vhdx.disk.chain import parent_file_name, windows_path_candidates
from vhdx.disk.image import read_structures
from vhdx.errors import VhdxError
from vhdx.findings import Severity
from vhdx.forensics.hashing import hash_file
from vhdx.ops.check import check_image
from vhdx.ops.merge import journal as merge_journal

DISK_SUFFIXES = (".vhdx", ".avhdx")
# Hyper-V configuration: .vmcx (2016 and later), .xml (2012 R2 and older), .vmrs (runtime state).
VM_CONFIG_SUFFIXES = (".vmcx", ".xml", ".vmrs")
JOURNAL_SUFFIX = merge_journal.JOURNAL_SUFFIX
VANISHED = "vanished during the scan"


def kind_of(name: str) -> str:
    """What a file is to the scan, by its name: "disk", "journal", "vm_config" or "other"."""
    lower = name.lower()
    if lower.endswith(DISK_SUFFIXES):
        return "disk"
    if lower.endswith(JOURNAL_SUFFIX):
        return "journal"
    if lower.endswith(VM_CONFIG_SUFFIXES):
        return "vm_config"
    return "other"


@dataclass(frozen=True)
class CheckSummary:
    """What ``vhdx check`` said about one file (``--check``): its exit code and finding codes."""

    exit_code: int
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    leaked_bytes: int = 0
    problem: str | None = None  # why the file could not be checked

    def to_json(self) -> dict:
        return {"exit_code": self.exit_code, "errors": list(self.errors), "warnings": list(self.warnings),
                "leaked_bytes": self.leaked_bytes, "problem": self.problem}


@dataclass(frozen=True)
class DiskProbe:
    """One VHDX/AVHDX file as its own headers and metadata describe it (GUIDs as text: small to pickle).

    ``error`` is set when the file could not be read as a VHDX; then only ``path`` and the sizes are known.
    ``allocated`` is what the file system holds for the file (``st_blocks``), None where it does not say.
    """

    path: str
    file_size: int = 0
    allocated: int | None = None
    error: str | None = None
    vanished: bool = False
    disk_type: str | None = None
    virtual_size: int | None = None
    block_size: int | None = None
    logical_sector_size: int | None = None
    physical_sector_size: int | None = None
    creator: str | None = None
    disk_id: str | None = None
    data_write_guid: str | None = None
    file_write_guid: str | None = None
    parent_linkages: tuple[str, ...] = ()
    parent_hints: tuple[tuple[str, str], ...] = ()  # locator (key, path) pairs, in the spec's order
    hints_present: tuple[str, ...] = ()  # host paths of the files the locator names that exist (not opened)
    dirty_log: bool = False
    check: CheckSummary | None = None
    sha256: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def has_parent(self) -> bool:
        return self.disk_type == "differencing"


@dataclass(frozen=True)
class JournalProbe:
    """A pending merge journal (``<destination>.merge-journal``): a merge into that disk did not finish."""

    path: str
    child: str | None = None
    destination: str | None = None
    state: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class ProbeOptions:
    check: bool = False  # also run the full check (reads the BAT)
    hash: bool = False  # also hash the file's bytes (SHA-256)


@dataclass
class BatchResult:
    """The probes of one task (files of one directory)."""

    disks: list[DiskProbe] = field(default_factory=list)
    journals: list[JournalProbe] = field(default_factory=list)


def error_text(exc: VhdxError) -> str:
    """The one-line message of a library error without the path (the record names the file)."""
    if exc.structure:
        where = exc.structure if exc.offset is None else f"{exc.structure} at offset {exc.offset:#x}"
        return f"{where}: {exc.message}"
    return exc.message


def hinted_paths(path: str, hints) -> list[str]:
    """Host paths a child's locator names, then its parent's file name next to the child.

    Translated as when opening a chain, absolute and normalised, in the order a reader tries them.
    """
    child_dir = os.path.dirname(os.path.abspath(path))
    out = []
    for key, value in hints:
        try:
            out.extend(windows_path_candidates(key, value, child_dir))
        except ValueError:  # unusable text in a hostile locator
            continue
    name = parent_file_name(types.SimpleNamespace(paths=hints))
    if name:
        out.append(os.path.join(child_dir, name))
    return [os.path.normcase(os.path.abspath(p)) for p in dict.fromkeys(out)]


def _present(paths: list[str]) -> tuple[str, ...]:
    found = []
    for path in paths:
        try:
            if os.path.isfile(path):
                found.append(path)
        except (OSError, ValueError):
            continue
    return tuple(found)


def _failed(path: str, base: dict, message: str) -> DiskProbe:
    vanished = not os.path.lexists(path)
    return DiskProbe(path, **base, error=VANISHED if vanished else message, vanished=vanished)


def probe_disk(path: str, options: ProbeOptions = ProbeOptions()) -> DiskProbe:  # frozen default
    """Probe one VHDX/AVHDX file; every failure is returned in the record, never raised."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return DiskProbe(path, error=VANISHED, vanished=True)
    except OSError as exc:
        return DiskProbe(path, error=f"cannot stat: {exc.strerror}")
    blocks = getattr(st, "st_blocks", None)
    base = {"file_size": st.st_size, "allocated": blocks * 512 if blocks is not None else None}
    try:
        image = read_structures(path)
    except VhdxError as exc:
        return _failed(path, base, error_text(exc))
    params = image.params
    locator = params.parent_locator
    hints = tuple(locator.paths) if locator and params.has_parent else ()
    probe = DiskProbe(
        path, **base, disk_type=image.disk_type.label, virtual_size=params.virtual_size,
        block_size=params.block_size, logical_sector_size=params.logical_sector_size,
        physical_sector_size=params.physical_sector_size, creator=image.creator,
        disk_id=str(params.virtual_disk_id), data_write_guid=str(image.data_write_guid),
        file_write_guid=str(image.file_write_guid),
        parent_linkages=tuple(str(g) for g in locator.linkages) if locator and params.has_parent else (),
        parent_hints=hints, hints_present=_present(hinted_paths(path, hints)) if hints else (),
        dirty_log=image.log.is_dirty)
    if options.check:
        probe = _with_check(probe)
    if options.hash:
        probe = _with_hash(probe)
    return probe


def _with_check(probe: DiskProbe) -> DiskProbe:
    report = check_image(probe.path)
    summary = CheckSummary(
        report.exit_code,
        tuple(f.code for f in report.findings if f.severity == Severity.ERROR),
        tuple(f.code for f in report.findings if f.severity == Severity.WARNING),
        report.leaked_bytes, report.error)
    return replace(probe, check=summary)


def _with_hash(probe: DiskProbe) -> DiskProbe:
    try:
        _size, digests = hash_file(probe.path, ("sha256",))
    except VhdxError as exc:
        return _failed(probe.path, {"file_size": probe.file_size, "allocated": probe.allocated},
                       f"hash: {error_text(exc)}")
    return replace(probe, sha256=digests["sha256"])


def probe_journal(path: str) -> JournalProbe:
    """Read a pending merge journal with the merge engine's own reader."""
    try:
        journal = merge_journal.read_journal(path)
    except VhdxError as exc:
        if not os.path.lexists(path):
            return JournalProbe(path, error=VANISHED)
        return JournalProbe(path, error=error_text(exc))
    return JournalProbe(path, journal.child, journal.destination, journal.state)


def probe_batch(disks: list[str], journals: list[str], options: ProbeOptions = ProbeOptions()) -> BatchResult:
    """One task: probe the disks and journals of one directory."""
    out = BatchResult()
    for path in disks:
        try:
            out.disks.append(probe_disk(path, options))
        except Exception as exc:  # one disk's failure is its result, not the end of the scan
            out.disks.append(DiskProbe(path, error=f"probe failed: {type(exc).__name__}: {exc}"))
    out.journals.extend(probe_journal(path) for path in journals)
    return out


__all__ = ["BatchResult", "CheckSummary", "DiskProbe", "JournalProbe", "ProbeOptions", "hinted_paths", "kind_of",
           "probe_batch", "probe_disk", "probe_journal"]
