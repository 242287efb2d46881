"""Offline repair of what ``check`` finds, done so that a crash at any point never leaves things worse.

``plan_repair`` (pure) turns a CheckReport into ordered RepairActions and Refusals; ``apply_repair`` carries
the actions out. Each action re-reads the file before it writes, so a repair interrupted anywhere can simply
be run again. How each stays crash-safe:

- a dirty log is replayed (``commit.replay_log_on_disk``): a new FileWriteGuid first, the sectors, then both
  headers with an empty log; replaying twice gives the same bytes;
- a bad or stale header copy is overwritten from the current one with a higher sequence number
  (``header.write_header_update``): until that write is complete the old current copy stays the valid one;
- a bad region table copy is overwritten from the good one: a torn write leaves it invalid, and readers then
  use the good copy;
- metadata table and BAT fixes go through the log (``commit.commit_through_log``: entry written and flushed,
  header names the log, sectors written, log emptied): a crash leaves the old bytes or a replayable log;
- a parent is relinked with ``relink.set_parent`` (metadata through the writer's log);
- trailing leaked space is cut with one truncate (nothing references it).

References: [MS-VHDX] §2.2.2.1 (header updates), §2.3 (log), §2.2.3 (region table copies).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace

import numpy as np

from vhdx.errors import InvalidRequestError, VhdxError
from vhdx.findings import Finding, Severity
from vhdx.format import constants as c
from vhdx.format import layouts
from vhdx.io import ImageIO
from vhdx.ops.check import CheckReport, check_image
from vhdx.ops.convert import raw_data_ranges
from vhdx.ops.relink import set_parent
from vhdx.structures.bat import BAT_DTYPE, Geometry, ceil_div
from vhdx.structures.commit import commit_through_log, empty_log, replay_log_on_disk
from vhdx.structures.header import HeaderSet, load_headers, write_header_update
from vhdx.structures.log import SECTOR, read_log
from vhdx.structures.log_build import DataWrite
from vhdx.structures.metadata import EXPECTED_ITEM_FLAGS, ITEM_FLAG_BITS, load_metadata
from vhdx.structures.region import load_region_table, read_region_table_copies, table_problems

# Why each kind of finding is not repaired (refusals name these reasons).
UNREPAIRABLE = {
    "NOT_VHDX": "the file is not a VHDX",
    "FILE_TRUNCATED": "bytes the file must hold are gone; restore it from a backup",
    "HEADER_NO_CURRENT": "no header copy is usable to restore the other from",
    "HEADER_LOG_PLACEMENT": "the current header's log fields are wrong and no copy holds better ones",
    "LOG_TRUNCATED": "the file is shorter than the log says it was; replaying would write into missing space",
    "LOG_INVALID": "the log asks for writes no log may make; replaying it would damage the file",
    "BAT_BEYOND_EOF": "the block's data is not in the file; dropping the entry would lose the reference",
    "BAT_OVERLAP": "two blocks claim the same space and at most one holds the right data",
    "BAT_OVERLAPS_STRUCTURE": "the block lies on top of another structure; its data cannot be trusted",
    "BAT_BITMAP_MISSING": "which sectors the block holds is unknown without its sector bitmap",
    "BAT_STATE_ILLEGAL": "the intended state of the entry is unknown",
    "BAT_REGION_SIZE": "the BAT region is too small for the disk; it cannot grow in place",
    "CHAIN_LOOP": "the chain refers back to itself; relink with --parent to a real parent",
    "CHAIN_SECTOR_SIZE": "parent and child sector sizes differ; no relink can fix that",
    "CHAIN_VIRTUAL_SIZE": "the parent is larger than the child",
    "MERGE_INTERRUPTED": "finish or roll back the merge with the merge command",
    "LAYOUT_INTERRUPTED": "finish it with the resize or compact command's --resume",
}
DEFAULT_REFUSAL = "no safe automatic repair exists for this"


@dataclass(frozen=True)
class RepairAction:
    """One change ``apply_repair`` will make, with the exact description printed for the user."""

    kind: str
    description: str
    codes: tuple[str, ...]
    offset: int | None = None
    argument: str | None = None  # e.g. the new parent path, or the size to truncate to
    ignore_id_mismatch: bool = False  # relink_parent only


@dataclass(frozen=True)
class Refusal:
    code: str
    structure: str
    offset: int | None
    reason: str


@dataclass(frozen=True)
class RepairPlan:
    """Ordered actions plus what will not be touched and why. Iterating yields the actions."""

    path: str
    actions: tuple[RepairAction, ...]
    refusals: tuple[Refusal, ...]

    def __iter__(self):
        return iter(self.actions)

    def __len__(self) -> int:
        return len(self.actions)

    def to_json(self) -> dict:
        return {"path": self.path,
                "actions": [{"kind": a.kind, "description": a.description, "codes": list(a.codes),
                             "offset": a.offset, "argument": a.argument} for a in self.actions],
                "refusals": [{"code": r.code, "structure": r.structure, "offset": r.offset, "reason": r.reason}
                             for r in self.refusals]}


def _hex(offset: int | None) -> str:
    return "" if offset is None else f" at {offset:#x}"


@dataclass
class _Planner:
    """What plan_repair gathers: the findings by code, the actions and refusals so far, the findings handled."""

    findings: list[Finding]
    by_code: dict[str, list[Finding]]
    actions: list[RepairAction]
    refusals: list[Refusal]
    handled: set[int]

    def take(self, codes, kind, description, offset=None, argument=None, flag=False) -> None:
        hits = [f for code in codes for f in self.by_code.get(code, []) if f.repairable]
        for f in hits:
            self.handled.add(id(f))
        self.actions.append(RepairAction(kind, description, tuple(dict.fromkeys(f.code for f in hits)), offset,
                                         argument, flag))


def plan_repair(report: CheckReport, *, leaks: bool = False, parent: str | None = None,
                ignore_id_mismatch: bool = False) -> RepairPlan:
    """Decide what to repair and what to refuse, from a check report alone (no I/O).

    Args:
        report: the check of the file to repair (its parents' findings are not repaired).
        leaks: also cut leaked space at the end of the file.
        parent: relink the file to this parent (moved or mismatched parent).
        ignore_id_mismatch: accept a new parent whose DataWriteGuid does not match the linkage.
    """
    findings = list(report.findings)
    by_code: dict[str, list[Finding]] = {}
    for f in findings:
        by_code.setdefault(f.code, []).append(f)
    if not report.checked:
        return RepairPlan(report.path, (), (Refusal("NOT_VHDX", "File", 0, report.error or UNREPAIRABLE["NOT_VHDX"]),))
    blocking = [f for f in findings if f.code in ("HEADER_NO_CURRENT", "LOG_TRUNCATED", "LOG_INVALID",
                                                  "HEADER_LOG_PLACEMENT")]
    if blocking:
        refusals = [Refusal(f.code, f.structure, f.offset, UNREPAIRABLE[f.code] + "; nothing was changed")
                    for f in blocking]
        return RepairPlan(report.path, (), tuple(refusals))
    st = _Planner(findings, by_code, [], [], set())
    _plan_log_and_headers(st)
    _plan_region_tables(st)
    _plan_metadata(st)
    _plan_bat(st)
    _plan_parent(st, parent, ignore_id_mismatch)
    _plan_leaks(st, leaks)
    _refuse_the_rest(st)
    return RepairPlan(report.path, tuple(st.actions), tuple(st.refusals))


def _plan_log_and_headers(st: _Planner) -> None:
    """Replay or clear the log (which rewrites both headers), else restore bad header copies."""
    log_fix = False
    if "LOG_DIRTY" in st.by_code:
        f = st.by_code["LOG_DIRTY"][0]
        st.take(("LOG_DIRTY", "LOG_TORN_ENTRY"), "replay_log",
                f"replay the log into the file{_hex(f.offset)} ({f.message.split(';')[0]}), then mark the log empty "
                "in both headers", f.offset)
        log_fix = True
    elif any(f.repairable for f in st.by_code.get("LOG_NO_VALID_SEQUENCE", [])):
        f = st.by_code["LOG_NO_VALID_SEQUENCE"][0]
        st.take(("LOG_NO_VALID_SEQUENCE", "LOG_TORN_ENTRY"), "clear_log",
                "mark the log empty in both headers (it holds no complete entry, so nothing was ever applied from it)",
                f.offset)
        log_fix = True
    header_codes = ("HEADER_SIGNATURE", "HEADER_CHECKSUM", "HEADER_VERSION", "HEADER_STALE")
    bad_headers = [f for code in header_codes for f in st.by_code.get(code, []) if f.repairable]
    if bad_headers:
        names = ", ".join(f"{f.structure}{_hex(f.offset)}" for f in bad_headers)
        if log_fix:
            # Replaying or clearing the log writes both header copies anew.
            for f in bad_headers:
                st.handled.add(id(f))
            last = st.actions[-1]
            st.actions[-1] = replace(last, codes=last.codes + tuple(f.code for f in bad_headers),
                                     description=last.description + f" (this also rewrites {names})")
        else:
            st.take(header_codes, "restore_header",
                    f"rewrite {names} from the current header with the next sequence number, then refresh the "
                    "current copy the same way", bad_headers[0].offset)


def _plan_region_tables(st: _Planner) -> None:
    region_codes = ("REGION_TABLE_SIGNATURE", "REGION_TABLE_CHECKSUM", "REGION_TABLE_ENTRY_COUNT",
                    "REGION_TABLE_MISMATCH")
    bad_tables = [f for code in region_codes for f in st.by_code.get(code, []) if f.repairable]
    if bad_tables:
        names = ", ".join(sorted({f"{f.structure}{_hex(f.offset)}" for f in bad_tables}))
        st.take(region_codes, "restore_region_table",
                f"overwrite the bad region table copy ({names}) with the good copy, byte for byte",
                bad_tables[0].offset)
        # Content problems of a copy that a good twin replaces are fixed by the same write.
        region_content = ("REGION_MISSING", "REGION_DUPLICATE", "REGION_ALIGNMENT", "REGION_OVERLAP",
                          "REGION_BEYOND_EOF", "REGION_UNKNOWN_REQUIRED")
        twin_names = {f.structure for f in bad_tables}
        for code in region_content:
            for f in st.by_code.get(code, []):
                if f.structure in twin_names or "REGION_TABLE_MISMATCH" in st.by_code:
                    st.handled.add(id(f))


def _plan_metadata(st: _Planner) -> None:
    meta = [f for code in ("METADATA_SIGNATURE", "METADATA_FLAGS") for f in st.by_code.get(code, []) if f.repairable]
    if meta:
        what = []
        if any(f.code == "METADATA_SIGNATURE" for f in meta):
            what.append("restore the 'metadata' signature")
        flags = [f for f in meta if f.code == "METADATA_FLAGS"]
        if flags:
            what.append("set the spec's flags on " + ", ".join(f.structure for f in flags))
        st.take(("METADATA_SIGNATURE", "METADATA_FLAGS"), "rewrite_metadata_table",
                f"metadata table{_hex(meta[0].offset)}: {' and '.join(what)} (through the log)", meta[0].offset)


def _plan_bat(st: _Planner) -> None:
    bat = [f for code in ("BAT_RESERVED_BITS", "BAT_SB_IN_NON_DIFFERENCING") for f in st.by_code.get(code, [])
           if f.repairable]
    if bat:
        n_bits = sum(1 for f in bat if f.code == "BAT_RESERVED_BITS")
        n_sb = sum(1 for f in bat if f.code == "BAT_SB_IN_NON_DIFFERENCING")
        what = []
        if n_bits:
            what.append("clear reserved bits in BAT entries")
        if n_sb:
            what.append("set stray sector bitmap entries of a non-differencing disk to NOT_PRESENT")
        st.take(("BAT_RESERVED_BITS", "BAT_SB_IN_NON_DIFFERENCING"), "fix_bat_entries",
                f"{' and '.join(what)} (first{_hex(bat[0].offset)}; through the log)", bat[0].offset)


def _plan_parent(st: _Planner, parent: str | None, ignore_id_mismatch: bool) -> None:
    """Relink to ``parent``, or refuse every parent finding with the flag that would fix it."""
    parent_findings = st.by_code.get("PARENT_NOT_FOUND", []) + st.by_code.get("PARENT_MISMATCH", []) \
        + st.by_code.get("CHAIN_LOOP", [])
    if parent:
        flag = " accepting a DataWriteGuid mismatch" if ignore_id_mismatch else ""
        st.take(("PARENT_NOT_FOUND", "PARENT_MISMATCH", "CHAIN_LOOP"), "relink_parent",
                f"point the parent locator at {parent}{flag} (through the log)",
                parent_findings[0].offset if parent_findings else None, parent, ignore_id_mismatch)
    else:
        for f in parent_findings:
            st.refusals.append(Refusal(f.code, f.structure, f.offset,
                                       "give the parent's new place with --parent NEW"
                                       + (" (and --ignore-id-mismatch to accept it)" if f.code == "PARENT_MISMATCH"
                                          else "")))
            st.handled.add(id(f))


def _plan_leaks(st: _Planner, leaks: bool) -> None:
    leak_findings = st.by_code.get("LEAKED_SPACE", [])
    if leaks:
        trailing = [f for f in leak_findings if f.repairable]
        if trailing:
            f = trailing[-1]
            st.take(("LEAKED_SPACE",), "truncate_leak",
                    f"truncate the file to {f.offset:#x} ({f.message.split(' ')[0]} leaked bytes at its end)",
                    f.offset, str(f.offset))
        for f in leak_findings:  # a leak is always a tail (space inside the file is free space, not a leak)
            st.handled.add(id(f))


def _refuse_the_rest(st: _Planner) -> None:
    """Every error no step handled is refused (leaks are never refused: they are only cut on request)."""
    for f in st.findings:
        if id(f) in st.handled or f.severity not in (Severity.ERROR,) or f.structure == "summary":
            continue
        if f.code in ("LEAKED_SPACE",):
            continue
        st.refusals.append(Refusal(f.code, f.structure, f.offset, UNREPAIRABLE.get(f.code, DEFAULT_REFUSAL)))


# --- applying --------------------------------------------------------------------------------------
def apply_repair(source, plan: RepairPlan) -> list[str]:
    """Carry out ``plan`` on a file (path, or a writable ``ImageIO``); returns one line per change made.

    Raises VhdxError when the file is not in the state the plan expects (e.g. another process changed it).
    """
    owns = not isinstance(source, ImageIO)
    io = ImageIO.open(source, writable=True) if owns else source
    done: list[str] = []
    relink = None
    try:
        for action in plan.actions:
            if action.kind == "relink_parent":
                relink = action
                continue
            if action.kind == "truncate_leak":
                continue
            done.extend(_APPLY[action.kind](io))
        if any(a.kind == "truncate_leak" for a in plan.actions):
            done.extend(_truncate_trailing_leak(io))
    finally:
        if owns:
            io.close()
    if relink is not None:
        if not owns:
            raise InvalidRequestError("relinking needs the file's path (the ImageIO given is still open)")
        result = set_parent(io.path, relink.argument, ignore_id_mismatch=relink.ignore_id_mismatch)
        done.append(f"parent locator: {dict(result.old_entries)} -> {dict(result.new_entries)}")
    return done


def _headers(io: ImageIO) -> HeaderSet:
    return load_headers(io)


def _replay_log(io: ImageIO) -> list[str]:
    headers = _headers(io)
    h = headers.current
    log = read_log(io, h.log_offset, h.log_length, h.log_guid)
    if not log.needs_replay:
        return ["log: nothing to replay any more (already replayed)"]
    refusal = log.refusal(io.path)
    if refusal is not None:
        raise refusal
    sectors = sum(e.descriptor_count for e in log.sequence)
    first, last = log.sequence[0].sequence_number, log.sequence[-1].sequence_number
    headers = replay_log_on_disk(io, headers, log)
    return [f"log: replayed {len(log.sequence)} entries (sequence {first}..{last}, {sectors} writes) into the file",
            f"headers: log GUID cleared in both copies (sequence now {headers.current.sequence_number})"]


def _clear_log(io: ImageIO) -> list[str]:
    headers = _headers(io)
    h = headers.current
    log = read_log(io, h.log_offset, h.log_length, h.log_guid)
    if log.needs_replay:
        return _replay_log(io)
    if h.log_guid == c.ZERO_GUID:
        return ["log: already empty"]
    headers = empty_log(io, headers, file_write_guid=uuid.uuid4())
    return [f"headers: log GUID {h.log_guid} cleared in both copies (sequence now "
            f"{headers.current.sequence_number})"]


def _restore_header(io: ImageIO) -> list[str]:
    headers = _headers(io)
    old = headers.other_copy
    h = headers.current
    headers = write_header_update(io, headers, replace(h, file_write_guid=uuid.uuid4()))
    first = headers.current_copy
    headers = write_header_update(io, headers, headers.current)
    problem = old.problem or "stale"
    return [f"{first.name} at {first.offset:#x}: rewritten from {headers.copies[1 - first.index].name} "
            f"(was: {problem}; sequence {first.header.sequence_number})",
            f"{headers.current_copy.name} at {headers.current_copy.offset:#x}: refreshed (sequence "
            f"{headers.current.sequence_number})"]


def _restore_region_table(io: ImageIO) -> list[str]:
    h = _headers(io).current
    copies = read_region_table_copies(io, exact=False)
    good = [cp for cp in copies if cp.valid and not table_problems(cp, h.log_offset, h.log_length, io.size)]
    if not good:
        raise VhdxError("no region table copy is good enough to restore the other from", structure="Region Table",
                        offset=c.REGION_TABLE_OFFSETS[0], path=io.path)
    src = good[0]
    done = []
    for i, off in enumerate(c.REGION_TABLE_OFFSETS):
        if io.read_at(off, c.REGION_TABLE_SIZE) != src.raw:
            io.write_at(off, src.raw)
            io.flush()
            done.append(f"Region Table {i + 1} at {off:#x}: overwritten with Region Table {src.index + 1}")
    return done or ["region tables: already identical and good"]


def _rewrite_metadata_table(io: ImageIO) -> list[str]:
    headers = _headers(io)
    h = headers.current
    regions = load_region_table(io, h.log_offset, h.log_length)
    region = regions.metadata
    table = bytearray(io.read_at(region.file_offset, c.METADATA_TABLE_SIZE))
    changes = []
    if table[: len(c.METADATA_SIGNATURE)] != c.METADATA_SIGNATURE:
        table[: len(c.METADATA_SIGNATURE)] = c.METADATA_SIGNATURE
        changes.append("signature restored")
    count = layouts.MetadataTableHeader.parse(bytes(table[: c.METADATA_TABLE_HEADER_SIZE])).entry_count
    for i in range(min(count, c.METADATA_TABLE_MAX_ENTRIES)):
        pos = c.METADATA_TABLE_HEADER_SIZE + c.METADATA_ENTRY_SIZE * i
        e = layouts.MetadataTableEntry.parse(bytes(table[pos : pos + c.METADATA_ENTRY_SIZE]))
        if e.item_id in EXPECTED_ITEM_FLAGS and not e.flags & c.META_IS_USER:
            want = (e.flags & ~ITEM_FLAG_BITS) | EXPECTED_ITEM_FLAGS[e.item_id]
            if want != e.flags:
                table[pos : pos + c.METADATA_ENTRY_SIZE] = layouts.MetadataTableEntry.build(
                    {"item_id": e.item_id, "offset": e.offset, "length": e.length, "flags": want,
                     "reserved2": e.reserved2})
                changes.append(f"entry {i} flags {e.flags:#x} -> {want:#x}")
    if not changes:
        return ["metadata table: nothing to change any more"]
    sectors = {region.file_offset + off: bytes(table[off : off + SECTOR]) for off in range(0, len(table), SECTOR)
               if table[off : off + SECTOR] != io.read_at(region.file_offset + off, SECTOR)}
    _commit_through_log(io, headers, sectors)
    load_metadata(io, region)  # the table must now parse; raises if not
    return [f"metadata table at {region.file_offset:#x}: {', '.join(changes)} ({len(sectors)} sector(s) through "
            "the log)"]


def _fix_bat_entries(io: ImageIO) -> list[str]:
    headers = _headers(io)
    h = headers.current
    regions = load_region_table(io, h.log_offset, h.log_length)
    p = load_metadata(io, regions.metadata).params
    g = Geometry(p.virtual_size, p.block_size, p.logical_sector_size, p.has_parent)
    bat_off = regions.bat.file_offset
    stride = g.chunk_ratio + 1
    per_sector = SECTOR // c.BAT_ENTRY_SIZE
    sectors: dict[int, bytes] = {}
    cleared = stray = 0
    step = max(1, (1 << 20) // per_sector) * per_sector
    for lo in range(0, g.bat_entries, step):
        hi = min(g.bat_entries, lo + step)
        n = ceil_div(hi - lo, per_sector) * per_sector
        raw = np.zeros(n, dtype=BAT_DTYPE)
        io.readinto_at(bat_off + lo * c.BAT_ENTRY_SIZE, raw)
        fixed = raw.copy()
        idx = np.arange(lo, lo + n)
        valid = idx < g.bat_entries
        bits = valid & ((fixed & np.uint64(c.BAT_RESERVED_MASK)) != 0)
        cleared += int(bits.sum())
        fixed[bits] &= ~np.uint64(c.BAT_RESERVED_MASK)
        if not g.has_parent:
            sb = valid & (idx % stride == g.chunk_ratio) & (fixed != 0)
            stray += int(sb.sum())
            fixed[sb] = 0
        changed = np.flatnonzero((fixed != raw).reshape(-1, per_sector).any(axis=1))
        for s in changed.tolist():
            sectors[bat_off + (lo + s * per_sector) * c.BAT_ENTRY_SIZE] = \
                fixed[s * per_sector : (s + 1) * per_sector].tobytes()
    if not sectors:
        return ["BAT: nothing to change any more"]
    _commit_through_log(io, headers, sectors)
    return [f"BAT at {bat_off:#x}: reserved bits cleared in {cleared} entries, {stray} stray sector bitmap "
            f"entries set to NOT_PRESENT ({len(sectors)} sector(s) through the log)"]


def _truncate_trailing_leak(io: ImageIO) -> list[str]:
    """Cut the unreferenced space at the end, as a fresh check of the file (after the other repairs) sees it."""
    report = check_image(io)
    if report.errors:
        raise VhdxError(f"not truncating: {report.errors[0].code} remains", structure="File", path=io.path)
    trailing = [f for f in report.find("LEAKED_SPACE") if f.repairable]
    old = io.real_size
    if not trailing:
        return [f"file: no leaked space at the end any more ({old} bytes)"]
    size = trailing[-1].offset
    io.truncate(size)
    io.flush()
    return [f"file: truncated from {old} to {size} bytes ({old - size} leaked bytes at the end released)"]


_APPLY = {
    "replay_log": _replay_log,
    "clear_log": _clear_log,
    "restore_header": _restore_header,
    "restore_region_table": _restore_region_table,
    "rewrite_metadata_table": _rewrite_metadata_table,
    "fix_bat_entries": _fix_bat_entries,
}


def _commit_through_log(io: ImageIO, headers: HeaderSet, sectors: dict[int, bytes]) -> HeaderSet:
    """Write whole 4 KiB sectors crash-safely, as a session of its own (new FileWriteGuid, log emptied after)."""
    writes = [DataWrite(offset, data) for offset, data in sectors.items()]
    return commit_through_log(io, headers, writes, flush_payload=False, start_session=True, empty_after=True)


# --- the whole job -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RepairResult:
    before: CheckReport
    plan: RepairPlan
    changes: tuple[str, ...]
    after: CheckReport | None
    dry_run: bool
    backup: str | None = None

    @property
    def exit_code(self) -> int:
        """0 no corruption left (leaks allowed), 2 corruption left, 1 unreadable; a dry run predicts the real run.

        The prediction: what the plan refuses stays (2), everything else is fixed (0).
        """
        report = self.after or self.before
        if report.exit_code == 1:
            return 1
        if self.dry_run:
            return 2 if self.plan.refusals else 0
        return 2 if report.errors else 0

    def to_json(self) -> dict:
        return {"dry_run": self.dry_run, "backup": self.backup, "before": self.before.to_json(),
                "plan": self.plan.to_json(), "changes": list(self.changes),
                "after": self.after.to_json() if self.after else None, "exit_code": self.exit_code}


def copy_sparse(src: str, dst: str) -> None:
    """Copy a file keeping its holes (a backup of a 64 TiB sparse disk must not become 64 TiB)."""
    if os.path.lexists(dst):
        raise InvalidRequestError(f"backup {dst} exists; choose another name")
    fin = os.open(src, os.O_RDONLY)
    try:
        size = os.fstat(fin).st_size
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for start, length in raw_data_ranges(fin, size):
                done = 0
                while done < length:
                    n = os.copy_file_range(fin, fout, length - done, start + done, start + done)
                    if n == 0:
                        break
                    done += n
            os.ftruncate(fout, size)
            os.fsync(fout)
        finally:
            os.close(fout)
    except OSError as exc:
        raise VhdxError(f"cannot back up to {dst}: {exc.strerror}", path=src) from None
    finally:
        os.close(fin)


def repair_image(path, *, dry_run: bool = False, backup: str | None = None, leaks: bool = False,
                 parent: str | None = None, ignore_id_mismatch: bool = False) -> RepairResult:
    """Check ``path``, plan the repair, and (unless ``dry_run``) back up, apply and check again."""
    path = os.fspath(path)
    if backup and os.path.lexists(backup):
        raise InvalidRequestError(f"backup {os.fspath(backup)} exists; choose another name")
    before = check_image(path)
    plan = plan_repair(before, leaks=leaks, parent=os.fspath(parent) if parent else None,
                       ignore_id_mismatch=ignore_id_mismatch)
    if dry_run or not plan.actions:
        return RepairResult(before, plan, (), None if dry_run else before, dry_run)
    if backup:
        copy_sparse(path, os.fspath(backup))
    changes = apply_repair(path, plan)
    after = check_image(path)
    if leaks and after.leaks and not after.errors:
        # Fixing a structure can free the space it pointed at (a stray bitmap block): reclaim that too.
        second = plan_repair(after, leaks=True)
        if second.actions and not second.refusals:
            changes += apply_repair(path, second)
            after = check_image(path)
    return RepairResult(before, plan, tuple(changes), after, dry_run, os.fspath(backup) if backup else None)
