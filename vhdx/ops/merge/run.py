"""The merge operation: locks, the journal's state machine (planned -> data_done -> relinked), resume and abort.

``merge`` adds to the plan the safety checks (``preflight``), the intent record (``journal``), the
DataWriteGuid hand-over of product note <12>, relinking of the merged child's own children, and the removal of
the merged files. Every file it changes or deletes stays open under its exclusive writer lock from planning to
the end (``HeldFiles``), and each merged file is checked unchanged right before it is deleted. ``abort_merge``
gives an interrupted merge up: a rollback before the destination's first change, else a list of what stays.

Why the chain keeps reading the same bytes during a merge: the destination only changes at sectors that a
layer above it defines (data or zeros), which those layers hide from every reader of the chain; and the
layer right above the destination accepts the destination's new DataWriteGuid (parent_linkage2) before the
destination takes it. Every step of a plan writes absolute values, so running it again after a crash (the
``--resume`` path) gives the same file.

References: [MS-VHDX] §2.6.1.2 (IsVirtualDisk items on merge), §2.6.2.6.3 and note <12> (parent_linkage2),
§2.2.2 (DataWriteGuid).
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace

from vhdx.disk.image import VhdxImage, open_image
from vhdx.errors import LockedError, MergeError, UnsupportedError, VhdxError
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.ops.merge import journal as mj
from vhdx.ops.merge.apply import apply_merge
from vhdx.ops.merge.inputs import read_dest_arrays, read_layer_arrays
from vhdx.ops.merge.plan import MergePlan, plan_merge
from vhdx.ops.merge.preflight import check_free_space, destination_index, preflight, same_file
from vhdx.ops.merge.relink import Opener, accept_new_guid, open_writable, relink_child, restore_linkage2
from vhdx.ops.merge.verify import compare_view, digest_view
from vhdx.structures.bat import WINDOW_ENTRIES, Geometry
from vhdx.structures.header import load_headers
from vhdx.structures.metadata import read_items


def _default_opener(path: str) -> ImageIO:
    return ImageIO.open(path, writable=True)


class HeldFiles:
    """Every file a merge changes or deletes, kept open under its exclusive writer lock until the merge ends.

    Images are opened on borrowed handles of these descriptors, so from planning to deletion no other writer
    gets in, and a second merge of the same chain is refused when it asks for the lock.
    """

    def __init__(self, opener: Opener, child: str) -> None:
        self._opener = opener
        self.child = child
        self._held: dict[str, ImageIO] = {}

    def hold(self, path: str) -> None:
        key = os.path.realpath(path)
        if key in self._held:
            return
        try:
            self._held[key] = self._opener(path)
        except LockedError:
            raise MergeError("in use by another process (a writer, or another merge of this chain); nothing was "
                             "changed", path=path) from None

    def holds(self, path: str) -> bool:
        return os.path.realpath(path) in self._held

    def open(self, path: str) -> ImageIO:
        io = self._held.get(os.path.realpath(path))
        return io.borrow() if io is not None else self._opener(path)

    def snapshot(self, path: str) -> mj.MergedLayer:
        """What a held file looks like now: its GUIDs, size and modification time."""
        io = self._held[os.path.realpath(path)]
        header = load_headers(io).current
        st = os.fstat(io.fd) if io.fd is not None else None
        return mj.MergedLayer(path, str(header.data_write_guid), str(header.file_write_guid), io.real_size,
                              st.st_mtime_ns if st is not None else None)

    def verify(self, recorded: mj.MergedLayer, *, skip=()) -> mj.MergedLayer:
        """Stop unless ``recorded.path`` is still the held file, unchanged; returns its snapshot."""
        io = self._held[os.path.realpath(recorded.path)]
        try:
            same = io.fd is None or os.path.samestat(os.stat(recorded.path), os.fstat(io.fd))
        except OSError:
            same = False
        now = self.snapshot(recorded.path)
        changed = recorded.changes_since(now, skip=skip)
        if not same or changed:
            labels = {"data_write_guid": "DataWriteGuid", "file_write_guid": "FileWriteGuid", "size": "size",
                      "mtime_ns": "modification time"}
            what = "replaced" if not same else "changed"
            detail = f" ({', '.join(labels[n] for n in changed)} differ)" if same else ""
            raise MergeError(f"{what} while the merge ran{detail}, by a writer that bypassed its lock; nothing was "
                             "deleted and the chain keeps what was written", path=recorded.path,
                             hint="merge_abort", hint_subject=self.child)
        return now

    def close(self) -> None:
        for io in self._held.values():
            io.close()
        self._held.clear()


def _out_of_space(exc: Exception) -> bool:
    text = exc.message if isinstance(exc, VhdxError) else str(exc)
    return any(os.strerror(code) in text for code in (errno.ENOSPC, errno.EDQUOT))


@contextmanager
def _resume_hint_when_full(child: str, destination: str):
    """ENOSPC in the middle of a merge: say which file and how to finish once there is room."""
    try:
        yield
    except VhdxError as exc:
        if not _out_of_space(exc):
            raise
        raise MergeError(f"no space left on the device while merging ({exc.message}); the chain still reads its "
                         "original data: free some space", path=exc.path or destination, hint="merge_resume",
                         hint_subject=child) from None


@dataclass(frozen=True)
class MergeResult:
    """What a merge did (or, with ``dry_run``, would do)."""

    child: str
    destination: str
    merged: tuple[str, ...]  # files folded in, child first
    dry_run: bool
    plan: dict | None  # MergePlan.summary()
    relinked: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()  # merged files renamed to *.merged
    bytes_moved: int = 0
    seconds: float = 0.0
    verified: bool | None = None
    resumed: bool = False
    warnings: tuple[str, ...] = field(default=())

    @property
    def mib_per_second(self) -> float:
        return self.bytes_moved / c.MiB / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {"child": self.child, "destination": self.destination, "merged": list(self.merged),
                "dry_run": self.dry_run, "plan": self.plan, "relinked": list(self.relinked),
                "removed": list(self.removed), "kept": list(self.kept), "bytes_moved": self.bytes_moved,
                "seconds": round(self.seconds, 3), "mib_per_second": round(self.mib_per_second, 1),
                "verified": self.verified, "resumed": self.resumed, "warnings": list(self.warnings)}

def _merged_items(dest_items, child_items):
    """IsVirtualDisk rule (§2.6.1.2): the destination's such items are replaced by the child's."""
    def key(item):
        return item.item_id, bool(item.flags & c.META_IS_USER)

    child_vd = {key(i): i for i in child_items if i.flags & c.META_IS_VIRTUAL_DISK}
    out, used = [], set()
    for item in dest_items:
        if item.flags & c.META_IS_VIRTUAL_DISK:
            if key(item) in child_vd:
                out.append(child_vd[key(item)])
                used.add(key(item))
        else:
            out.append(item)
    out.extend(i for k, i in child_vd.items() if k not in used)
    return out


def _write_destination(journal: mj.MergeJournal, plan: MergePlan, sources: Sequence[ImageIO], child_items,
                       opener: Opener, progress) -> int:
    """New DataWriteGuid, the IsVirtualDisk items (and a larger size), then the data and the BAT.

    One writing session: the items are staged first and committed with the sector bitmaps, after the data is
    flushed. A destination that grows is closed and opened again in between, so that its BAT is read at the
    new size before entries past the old end are written.
    """
    with open_writable(journal.destination, opener) as image:
        if image.data_write_guid not in (journal.old_guid, journal.new_guid):
            raise MergeError(f"the destination's DataWriteGuid is {image.data_write_guid}, neither the one the "
                             "merge was planned against nor the new one: it was changed meanwhile",
                             path=image.path)
        image.writer.begin(changes_data=True, data_write_guid=journal.new_guid)
        current = read_items(image.io, image.metadata)
        wanted = _merged_items(current, child_items)
        grows = plan.virtual_size > image.virtual_size
        if grows:
            g = Geometry(plan.virtual_size, image.block_size, image.logical_sector_size, image.has_parent)
            needed = g.bat_entries * c.BAT_ENTRY_SIZE
            if needed > image.regions.bat.length:
                raise UnsupportedError(f"the destination's BAT region ({image.regions.bat.length} bytes) cannot "
                                       f"describe the child's size ({needed} bytes needed)", path=image.path)
            have = image.geometry.bat_entries * c.BAT_ENTRY_SIZE
            # The new entries must read NOT_PRESENT: stale bytes there are cleared through the log, a window at a
            # time (a region sized for 64 TiB holds 512 MiB of entries; zeros over zeros change nothing).
            step = WINDOW_ENTRIES * c.BAT_ENTRY_SIZE
            for pos in range(have, needed, step):
                image.writer.stage_changed(image.bat.file_offset + pos, bytes(min(step, needed - pos)))
        if wanted != current:
            image.writer.rewrite_metadata(wanted)
        if not grows:
            return apply_merge(image, plan, sources, progress=progress)
    with open_writable(journal.destination, opener) as image:
        image.writer.begin(changes_data=True, data_write_guid=journal.new_guid)
        return apply_merge(image, plan, sources, progress=progress)


def _check_chain_matches(journal: mj.MergeJournal, layers: Sequence[VhdxImage]) -> None:
    k = len(journal.layers)
    ok = len(layers) > k and same_file(layers[k].path, journal.destination)
    for recorded, layer in zip(journal.layers, layers[:k], strict=False):
        ok = ok and same_file(layer.path, recorded.path) and str(layer.data_write_guid) == recorded.data_write_guid
    if not ok:
        raise MergeError("the chain is no longer the one the merge was planned for (a layer was written to or "
                         "replaced); the merge cannot continue", path=journal.child)


def _run(journal: mj.MergeJournal, plan: MergePlan | None, *, search_dirs, verify: bool, progress,
         held: HeldFiles, resumed: bool, started: float, warnings=(), top: VhdxImage | None = None) -> MergeResult:
    """Carry the journal from its step to the end; ``top``: the chain as planned, opened under the locks."""
    moved, verified = 0, None
    if journal.state == "planned":
        with nullcontext(top) if top is not None else open_image(journal.child, search_dirs=search_dirs) as top:
            layers = top.layers
            _check_chain_matches(journal, layers)
            k = len(journal.layers)
            accepting = journal.layers[-1]
            # A resumed merge may already have written the accepting layer's locator (FileWriteGuid, mtime).
            expected = [held.verify(layer, skip=("file_write_guid", "mtime_ns") if resumed and layer is accepting
                                    else ()) for layer in journal.layers]
            before = digest_view(top, plan.dest_block_size, plan.virtual_size) if verify else None
            child_items = read_items(top.io, top.metadata)
            accept_new_guid(accepting.path, journal.new_guid, held.open)
            expected[-1] = held.snapshot(accepting.path)
            moved = _write_destination(journal, plan, [layer.io for layer in layers[:k]], child_items, held.open,
                                       progress)
        if verify:
            with open_image(journal.destination, search_dirs=search_dirs) as merged:
                bad = compare_view(before, merged)
            if bad.count:
                raise MergeError(f"verification failed: {bad.count} block(s) differ after the merge (first: block "
                                 f"{bad.first}); the merged files are left in place and the chain still reads "
                                 "the original data", path=journal.destination)
            verified = True
        # The layers were read during the data phase: they must still be what was merged.
        expected = [held.verify(layer) for layer in expected]
        journal = replace(journal, layers=tuple(expected)).advanced("data_done")
        mj.write_journal(journal)
    relinked = tuple(journal.dependents)
    if journal.state == "data_done":
        for path in journal.dependents:
            relink_child(path, journal.destination, journal.new_guid, held.open)
        if journal.dependents:  # (without any, resuming from data_done does the same as from relinked)
            journal = journal.advanced("relinked")
            mj.write_journal(journal)
    removed, kept = [], []
    for layer in journal.layers:
        if held.holds(layer.path):  # gone already when a crash came after its deletion
            held.verify(layer)  # right before it goes: a write that got past the lock must not be lost
        if journal.keep:
            mj.rename_file(layer.path, layer.path + mj.MERGED_SUFFIX, flush_folder=False)
            kept.append(layer.path + mj.MERGED_SUFFIX)
        else:
            mj.remove_file(layer.path, flush_folder=False)
            removed.append(layer.path)
    # The merged files are gone for good before the record that names them goes (one flush per folder).
    for folder in dict.fromkeys(os.path.dirname(layer.path) for layer in journal.layers):
        mj.fsync_dir(folder)
    mj.remove_journal(journal)
    return MergeResult(journal.child, journal.destination, tuple(layer.path for layer in journal.layers), False,
                       plan.summary() if plan is not None else None, relinked, tuple(removed), tuple(kept), moved,
                       time.monotonic() - started, verified, resumed, tuple(warnings))


def merge(child, into=None, *, dry_run: bool = False, verify: bool = False,
          progress: Callable[[int, int], None] | None = None, keep: bool = False, search_dirs=(),
          force: bool = False, resume: bool = False, opener: Opener | None = None) -> MergeResult:
    """Merge the differencing disk ``child`` into its parent, or down to the ancestor ``into``.

    Like ``Merge-VHD -Path child [-DestinationPath into]``: afterwards the destination reads what the child
    read, the child and the layers between are deleted (``keep``: renamed to ``*.merged``), and the child's own
    children are relinked to the destination. From planning to the end every file the merge changes or deletes
    is held open under an exclusive writer lock, and each merged file is checked unchanged right before it goes.

    Args:
        child: the differencing disk to merge.
        into: an ancestor of ``child`` (default: its parent).
        dry_run: plan and check only; nothing is written.
        verify: compare the chain's view before with the destination's view after, block by block.
        progress: called as ``progress(done_bytes, total_bytes)`` while data moves.
        keep: rename the merged files instead of deleting them.
        search_dirs: more folders to look in for parents and for disks that depend on the destination.
        force: merge even though other disks depend on the destination (they stop opening afterwards).
        resume: finish an interrupted merge of ``child`` from its journal (none: merge it now).
        opener: opens a file for writing (default ``ImageIO.open(path, writable=True)``).
    """
    child = os.path.abspath(os.fspath(child))
    opener = opener or _default_opener
    started = time.monotonic()
    if resume:
        pending = find_interrupted(child, search_dirs)
        if pending is not None:
            if into is not None and not same_file(os.fspath(into), pending.destination):
                raise MergeError(f"the interrupted merge of this disk goes into {pending.destination}, not "
                                 f"{os.fspath(into)}", path=child)
            return _resume(pending, search_dirs=search_dirs, verify=verify, progress=progress, opener=opener,
                           started=started)
        # Nothing was begun: an ordinary merge.
    held = HeldFiles(opener, child)
    try:
        if not dry_run:
            with open_image(child, search_dirs=search_dirs) as top:
                layers = top.layers
                for layer in layers[: destination_index(layers, into) + 1]:
                    held.hold(layer.path)
        # (Re)opened under the locks: what is planned now cannot change before the merge ends.
        with open_image(child, search_dirs=search_dirs) as top, ExitStack() as hint:
            layers = top.layers
            k = destination_index(layers, into)
            if not dry_run and not all(held.holds(layer.path) for layer in layers[: k + 1]):
                raise MergeError("the chain changed while the merge was starting; nothing was changed, try again",
                                 path=child)
            dependents, warnings = preflight(layers, k, search_dirs, force, probe_writers=dry_run)
            upper, dest = layers[:k], layers[k]
            plan = plan_merge([read_layer_arrays(layer) for layer in upper], read_dest_arrays(dest),
                              virtual_size=top.virtual_size)
            check_free_space(dest.path, plan)
            merged = tuple(os.path.abspath(layer.path) for layer in upper)
            if dry_run:
                return MergeResult(child, os.path.abspath(dest.path), merged, True, plan.summary(),
                                   relinked=tuple(dependents), seconds=time.monotonic() - started,
                                   warnings=tuple(warnings))
            for path in dependents:  # relinked at the end
                held.hold(path)
            locator = dict(upper[-1].params.parent_locator.entries)
            journal = mj.MergeJournal(
                child=child, destination=os.path.abspath(dest.path), destination_guid=str(dest.data_write_guid),
                new_data_write_guid=str(uuid.uuid4()),
                layers=tuple(replace(held.snapshot(layer.path), path=path)
                             for path, layer in zip(merged, upper, strict=True)),
                dependents=tuple(os.path.abspath(p) for p in dependents), plan_digest=plan.digest, keep=keep,
                previous_linkage2=locator.get(c.PARENT_LINKAGE2_KEY))
            hint.enter_context(_resume_hint_when_full(child, journal.destination))
            # The plan and the intent are durable before the first byte of any disk changes (the journal's
            # folder flush covers the plan's rename too: both sit next to the destination).
            mj.atomic_write(journal.plan_path, plan.to_bytes(), flush_folder=False)
            mj.write_journal(journal)
            return _run(journal, plan, search_dirs=search_dirs, verify=verify, progress=progress, held=held,
                        resumed=False, started=started, warnings=warnings, top=top)
    finally:
        held.close()


def find_interrupted(child: str, search_dirs=()) -> mj.MergeJournal | None:
    """The journal of an interrupted merge that started from ``child``, if there is one."""
    child = os.path.abspath(child)
    folders = [os.path.dirname(child), *(os.fspath(d) for d in search_dirs)]
    found = mj.find_journals_for_child(child, folders)
    if not found and os.path.exists(child):
        try:
            with open_image(child, search_dirs=search_dirs) as top:
                for layer in top.layers[1:]:
                    journal = mj.journal_for_destination(layer.path)
                    if journal is not None and same_file(journal.child, child):
                        found.append(journal)
        except VhdxError:
            pass
    return found[0] if found else None


def _hold_journal_files(held: HeldFiles, journal: mj.MergeJournal) -> None:
    """Lock what an interrupted merge still changes or deletes (files it already deleted are skipped)."""
    for path in (journal.destination, *(layer.path for layer in journal.layers), *journal.dependents):
        if os.path.exists(path):
            held.hold(path)


def _resume(journal: mj.MergeJournal, *, search_dirs, verify, progress, opener, started) -> MergeResult:
    held = HeldFiles(opener, journal.child)
    try:
        _hold_journal_files(held, journal)
        plan = None
        if journal.state == "planned":
            try:
                with open(journal.plan_path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise MergeError(f"the saved merge plan is missing: {exc.strerror}", path=journal.plan_path,
                                 hint="merge_abort", hint_subject=journal.child) from None
            plan = MergePlan.from_bytes(data, journal.plan_path)
            if plan.digest != journal.plan_digest:
                raise MergeError("the saved merge plan does not match the digest in the journal",
                                 path=journal.plan_path)
        with _resume_hint_when_full(journal.child, journal.destination):
            return _run(journal, plan, search_dirs=search_dirs, verify=verify, progress=progress, held=held,
                        resumed=True, started=started)
    finally:
        held.close()


# --- giving an interrupted merge up --------------------------------------------------------------------
@dataclass(frozen=True)
class AbortResult:
    """What ``abort`` did: a full rollback, or the merge given up with what it had already done."""

    child: str
    destination: str
    state: str  # the journal's step when the merge stopped
    rolled_back: bool  # True: every file is as before the merge
    remains: tuple[str, ...]  # what stays changed, one sentence each (empty after a rollback)

    def to_json(self) -> dict:
        return {"child": self.child, "destination": self.destination, "state": self.state,
                "rolled_back": self.rolled_back, "remains": list(self.remains)}


def abort_merge(child, *, search_dirs=(), opener: Opener | None = None) -> AbortResult:
    """Give up the interrupted merge of ``child`` (``vhdx merge --abort``); never deletes or loses data.

    Before its point of no return (the destination's first change, when it takes its new DataWriteGuid) the
    merge is rolled back entirely: the accepting layer's parent locator gets its former parent_linkage2 back.
    Later, the journal is removed and what stays changed is listed; the chain reads the same in every case.
    """
    child = os.path.abspath(os.fspath(child))
    journal = find_interrupted(child, search_dirs)
    if journal is None:
        raise MergeError("no interrupted merge of this disk was found (no *.merge-journal names it); nothing to "
                         "abort", path=child)
    if not os.path.exists(journal.destination):
        raise MergeError(f"the destination {journal.destination} of the interrupted merge is gone; nothing to roll "
                         f"back (remove {journal.path} and {journal.plan_path} by hand)", path=child)
    held = HeldFiles(opener or _default_opener, journal.child)
    try:
        _hold_journal_files(held, journal)
        accepting = journal.layers[-1].path
        dest_guid = held.snapshot(journal.destination).data_write_guid
        untouched = journal.state == "planned" and dest_guid.lower() == journal.destination_guid.lower()
        if untouched and os.path.exists(accepting):
            restore_linkage2(accepting, journal.new_guid, journal.previous_linkage2, held.open)
        remains = () if untouched else _what_remains(journal)
        mj.remove_journal(journal)
    finally:
        held.close()
    return AbortResult(journal.child, journal.destination, journal.state, untouched, remains)

def _what_remains(journal: mj.MergeJournal) -> tuple[str, ...]:
    dest, child = journal.destination, journal.child
    present = [layer.path for layer in journal.layers if os.path.exists(layer.path)]
    gone = [layer.path for layer in journal.layers if not os.path.exists(layer.path)]
    out = []
    if journal.state == "planned":
        out.append(f"{dest} has its new DataWriteGuid {journal.new_data_write_guid} and part of the merged data, "
                   f"only where {child} and the layers above it hide it: the chain reads as before, {dest} read "
                   "alone is partly merged")
        out.append(f"{journal.layers[-1].path} accepts that DataWriteGuid (parent_linkage2), so it still opens "
                   f"on {dest}")
        out.append(f"space the merge added to {dest} may show as leaked in `vhdx check` (`vhdx repair --leaks` "
                   "reclaims it)")
    else:
        out.append(f"{dest} holds the whole merge: it reads what {child} read")
        if present:
            out.append(f"{', '.join(present)} are kept and read the same as before; nothing needs them any more")
        if journal.state == "relinked" and journal.dependents:
            out.append(f"{', '.join(journal.dependents)} already point at {dest}")
    if gone:
        out.append(f"{', '.join(gone)} were already deleted")
    out.append(f"`vhdx merge {child}` merges afresh whenever wanted" if os.path.exists(child)
               else f"{child} no longer exists")
    return tuple(out)
