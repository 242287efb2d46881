"""The merge intent record: what a merge is about to do, written durably before the destination changes.

A journal sits next to the destination as ``<destination>.merge-journal`` (JSON) with the saved plan beside
it (``<destination>.merge-plan.npz``). Both are written as a temporary file, flushed, renamed into place and
the folder flushed, so after a crash either the old or the new record exists, never a torn one. The journal
names the child, the destination, every layer being folded in with its DataWriteGuid, the new DataWriteGuid
the destination takes, the plan digest and the step reached; ``vhdx merge --resume`` continues from it and
``vhdx check --chain`` reports it.

Steps: ``planned`` (nothing or part of the destination changed) -> ``data_done`` (destination final) ->
``relinked`` (children of the merged child point at the destination) -> the record is removed after the
merged files are deleted or renamed. Each merged layer is recorded with its GUIDs, size and mtime (taken under
the merge's lock, again at ``data_done``) so that no file changed by another writer is ever deleted;
``vhdx merge --abort`` removes the record, rolling the merge back while the destination is still untouched.

References: [MS-VHDX] §2.6.2.6.3 and product note <12> (parent_linkage2 during a merge), §2.2.2 (DataWriteGuid).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

from vhdx.errors import MergeError
from vhdx.findings import Severity

JOURNAL_SUFFIX = ".merge-journal"
PLAN_SUFFIX = ".merge-plan.npz"
MERGED_SUFFIX = ".merged"
JOURNAL_VERSION = 1
STATES = ("planned", "data_done", "relinked")


@dataclass(frozen=True)
class MergedLayer:
    """One file folded into the destination (the child first), with the DataWriteGuid it had when planned."""

    path: str
    data_write_guid: str
    # The file as last seen under the merge's lock (None in older journals): any difference before it is
    # deleted means a writer got past the lock, and the merge stops instead of losing that write.
    file_write_guid: str | None = None
    size: int | None = None
    mtime_ns: int | None = None

    def changes_since(self, now: MergedLayer, *, skip=()) -> list[str]:
        """Names of the recorded properties ``now`` differs in (unrecorded ones and ``skip`` are not compared)."""
        names = ("data_write_guid", "file_write_guid", "size", "mtime_ns")
        return [n for n in names
                if n not in skip and getattr(self, n) is not None and getattr(self, n) != getattr(now, n)]


@dataclass(frozen=True)
class MergeJournal:
    child: str
    destination: str
    destination_guid: str  # DataWriteGuid of the destination before the merge
    new_data_write_guid: str  # the destination's DataWriteGuid afterwards (in the child's parent_linkage2 first)
    layers: tuple[MergedLayer, ...]  # child first, down to the destination's own child
    dependents: tuple[str, ...]  # children of the merged child, relinked to the destination at the end
    plan_digest: str
    keep: bool = False
    previous_linkage2: str | None = None  # the accepting layer's parent_linkage2 before the merge (for --abort)
    state: str = "planned"
    version: int = JOURNAL_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        return journal_path(self.destination)

    @property
    def plan_path(self) -> str:
        return plan_path(self.destination)

    @property
    def new_guid(self) -> uuid.UUID:
        return uuid.UUID(self.new_data_write_guid)

    @property
    def old_guid(self) -> uuid.UUID:
        return uuid.UUID(self.destination_guid)

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(layer) for layer in self.layers]
        d["dependents"] = list(self.dependents)
        return d

    @classmethod
    def from_json(cls, data: dict, where: str) -> MergeJournal:
        try:
            if data.get("version") != JOURNAL_VERSION:
                raise MergeError(f"unknown merge journal version {data.get('version')!r}", path=where)
            if data.get("state") not in STATES:
                raise MergeError(f"unknown merge journal state {data.get('state')!r}", path=where)
            layers = tuple(MergedLayer(str(x["path"]), str(x["data_write_guid"]), x.get("file_write_guid"),
                                       x.get("size"), x.get("mtime_ns")) for x in data["layers"])
            for key in ("destination_guid", "new_data_write_guid"):
                uuid.UUID(data[key])
            return cls(child=str(data["child"]), destination=str(data["destination"]),
                       destination_guid=str(data["destination_guid"]),
                       new_data_write_guid=str(data["new_data_write_guid"]), layers=layers,
                       dependents=tuple(str(p) for p in data["dependents"]), plan_digest=str(data["plan_digest"]),
                       keep=bool(data.get("keep", False)), previous_linkage2=data.get("previous_linkage2"),
                       state=str(data["state"]),
                       extra=dict(data.get("extra") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise MergeError(f"malformed merge journal ({type(exc).__name__}: {exc})", path=where) from None

    def advanced(self, state: str) -> MergeJournal:
        return replace(self, state=state)


def journal_path(destination: str) -> str:
    return os.path.abspath(destination) + JOURNAL_SUFFIX


def plan_path(destination: str) -> str:
    return os.path.abspath(destination) + PLAN_SUFFIX


def fsync_dir(folder: str) -> None:
    """Make a rename or unlink in ``folder`` durable."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # platforms without directory descriptors
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, *, flush_folder: bool = True) -> None:
    """Write ``path`` so that a crash leaves either its old content or ``data`` (tmp, fsync, rename, fsync dir).

    ``flush_folder=False`` leaves the folder flush to the caller's next one (several renames, one flush).
    """
    tmp = path + ".tmp"
    try:
        # A stale or planted temporary goes first (unlinking a symlink leaves its target alone); then a file of
        # our own, never through a symlink or a file someone else put there in between.
        if os.path.lexists(tmp):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno != errno.EEXIST:  # (EEXIST: someone else's file appeared at the name; leave it)
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # no half-written temporary left behind (a full disk, a failed rename)
        raise MergeError(f"cannot write: {exc.strerror}", path=path) from None
    if flush_folder:
        fsync_dir(os.path.dirname(path))


def remove_file(path: str, *, flush_folder: bool = True) -> None:
    """Delete ``path`` if it exists and flush its folder (``flush_folder=False``: the caller flushes it later)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise MergeError(f"cannot delete: {exc.strerror}", path=path) from None
    if flush_folder:
        fsync_dir(os.path.dirname(path))


def rename_file(src: str, dst: str, *, flush_folder: bool = True) -> None:
    """Rename ``src`` to ``dst`` (nothing to do when ``src`` is gone and ``dst`` exists: done before a crash)."""
    if not os.path.exists(src) and os.path.exists(dst):
        return
    try:
        os.replace(src, dst)
    except OSError as exc:
        raise MergeError(f"cannot rename to {dst}: {exc.strerror}", path=src) from None
    if flush_folder:
        fsync_dir(os.path.dirname(dst))


def write_journal(journal: MergeJournal) -> None:
    atomic_write(journal.path, json.dumps(journal.to_json(), indent=2).encode())


def read_journal(path: str) -> MergeJournal:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except OSError as exc:
        raise MergeError(f"cannot read merge journal: {exc.strerror}", path=path) from None
    except ValueError:
        raise MergeError("merge journal is not valid JSON", path=path) from None
    if not isinstance(data, dict):
        raise MergeError("merge journal is not a JSON object", path=path)
    return MergeJournal.from_json(data, path)


def journal_for_destination(destination: str) -> MergeJournal | None:
    """The pending journal of a merge into ``destination``, if any (``check`` reports it)."""
    path = journal_path(destination)
    return read_journal(path) if os.path.exists(path) else None


def folder_entries(folders) -> Iterator[tuple[str, str]]:
    """(name, absolute path) of every entry of each folder, in name order.

    A folder that cannot be listed is passed over (a search folder may be gone or unreadable).
    """
    for folder in folders:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            yield name, os.path.join(os.path.abspath(folder), name)


def find_journals_for_child(child: str, folders) -> list[MergeJournal]:
    """Pending journals in ``folders`` whose merge started from ``child`` (the child may be deleted already)."""
    want = os.path.normcase(os.path.abspath(child))
    found, seen = [], set()
    for name, path in folder_entries(folders):
        if not name.endswith(JOURNAL_SUFFIX) or path in seen:
            continue
        seen.add(path)
        journal = read_journal(path)
        if os.path.normcase(os.path.abspath(journal.child)) == want:
            found.append(journal)
    return found


def remove_journal(journal: MergeJournal) -> None:
    """Last step of a merge: the plan, then the record itself (one folder flush for both)."""
    remove_file(journal.plan_path, flush_folder=False)
    remove_file(journal.path)


def report_interrupted_merge(ctx) -> None:
    """Called by ``check``: a pending journal next to the checked file means a merge into it did not finish."""
    try:
        journal = journal_for_destination(ctx.path)
    except MergeError as exc:
        ctx.add(Severity.WARNING, "MERGE_INTERRUPTED", "merge journal", None,
                f"a merge into this disk left a journal that cannot be read ({exc.message})")
        return
    if journal is None:
        return
    ctx.add(Severity.WARNING, "MERGE_INTERRUPTED", "merge journal", None,
            f"the merge of {journal.child} into this disk stopped at step '{journal.state}'; the chain still "
            f"reads its original data; finish it with `vhdx merge --resume {journal.child}` (or undo it with "
            f"`vhdx merge --abort {journal.child}`)")
