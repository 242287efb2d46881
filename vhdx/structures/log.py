"""The metadata log: parse, validate, find the active sequence and replay (writers build entries: log_build).

The log is never read whole: slots are scanned a piece at a time, entries are checked in growing pieces and
sector images stay in the log until they are written or patched into a read, so memory does not grow with the
log's length, and finding the active sequence is linear in the number of entries. Every write of the active
sequence is checked against what a log may change (``log_rules.target_problem``, the one rule) before any replay, in
memory or on disk; ``LogState.refusal`` is the error every caller raises for a log that must not be replayed.

References: [MS-VHDX] §2.3 (log), §2.3.1 (entry, descriptors, data sector), §2.3.2 (entry validity),
§2.3.3 (log replay).
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vhdx.errors import FormatError
from vhdx.findings import Code, Problem, Severity
from vhdx.format import constants as c
from vhdx.format import layouts
from vhdx.format.checksum import crc32c
from vhdx.io import ImageIO, Overlay
from vhdx.lazy import np
from vhdx.structures.header import log_placement_problems

if TYPE_CHECKING:
    from vhdx.structures.log_rules import LogBounds

SECTOR = c.LOG_SECTOR_SIZE


# Largest read made at once while scanning or replaying: memory stays bounded whatever the log's length.
CHUNK = 1 << 20


@dataclass(frozen=True)
class LogEntry:
    """One valid log entry (its descriptors stay in the log and are read again when replayed)."""

    log_offset: int  # offset of the entry inside the log
    sequence_number: int
    tail: int
    entry_length: int
    flushed_file_offset: int
    last_file_offset: int
    log_guid: uuid.UUID
    descriptor_count: int = 0
    data_count: int = 0


@dataclass(frozen=True)
class LogViolation:
    """A valid entry of the active sequence that asks for a write no log may make (``LOG_INVALID``)."""

    entry_offset: int  # file offset of the entry
    message: str


class LogReader:
    """Reads the circular log of one file in bounded pieces (nothing holds the whole log)."""

    def __init__(self, io: ImageIO, log_offset: int, log_length: int) -> None:
        self.io, self.log_offset, self.size = io, log_offset, log_length
        self._window: tuple[int, bytes] = (-1, b"")  # the last CHUNK-aligned piece read: small reads reuse it

    def read(self, start: int, length: int) -> bytes:
        """``length`` bytes from log position ``start``, wrapping around the end of the log."""
        start %= self.size
        base = start - start % CHUNK
        if start + length <= min(base + CHUNK, self.size):
            if self._window[0] != base:
                self._window = (base, self.io.read_file_at(self.log_offset + base, min(CHUNK, self.size - base)))
            return self._window[1][start - base : start - base + length]
        first = min(length, self.size - start)
        data = self.io.read_file_at(self.log_offset + start, first)
        if first < length:
            data += self.io.read_file_at(self.log_offset, length - first)
        return data


def descriptor_sectors(descriptor_count: int) -> int:
    """4 KiB sectors holding the header and ``descriptor_count`` descriptors (never 0)."""
    return -(-(descriptor_count + 2) // c.DESCRIPTORS_PER_SECTOR)


def _descriptor_chunks(reader: LogReader, entry_pos: int, count: int):
    """(index of the first descriptor, descriptor array) pieces, growing from one sector to CHUNK bytes.

    Growing geometrically keeps a scan linear: a slot that fails early costs little, a long entry few reads.
    """
    done, step = 0, (SECTOR - c.LOG_ENTRY_HEADER_SIZE) // c.LOG_DESCRIPTOR_SIZE
    while done < count:
        n = min(step, count - done)
        raw = reader.read(entry_pos + c.LOG_ENTRY_HEADER_SIZE + done * c.LOG_DESCRIPTOR_SIZE,
                          n * c.LOG_DESCRIPTOR_SIZE)
        yield done, np.frombuffer(raw, dtype=layouts.LOG_DESCRIPTOR_DTYPE)
        done += n
        step = min(step * 2, CHUNK // c.LOG_DESCRIPTOR_SIZE)


def _data_sectors_ok(reader: LogReader, first_pos: int, count: int, sequence_number: int) -> bool:
    """Every data sector has the ``data`` signature and the entry's sequence number (§2.3.1.4)."""
    done, step = 0, 1
    high, low = sequence_number >> 32, sequence_number & 0xFFFFFFFF
    while done < count:
        n = min(step, count - done)
        raw = np.frombuffer(reader.read(first_pos + done * SECTOR, n * SECTOR), dtype=np.uint8).reshape(n, SECTOR)
        heads = raw[:, :8].copy().view("<u4")
        lows = raw[:, SECTOR - 4 :].copy().view("<u4")[:, 0]
        if not ((heads[:, 0] == _DATA_SIG) & (heads[:, 1] == high) & (lows == low)).all():
            return False
        done += n
        step = min(step * 2, CHUNK // SECTOR)
    return True


_DATA_SIG = int.from_bytes(c.DATA_SECTOR_SIGNATURE, "little")


def _entry_checksum_ok(reader: LogReader, pos: int, length: int, stored: int) -> bool:
    crc = 0
    done = 0
    while done < length:
        n = min(CHUNK, length - done)
        piece = bytearray(reader.read(pos + done, n))
        if done == 0:
            piece[c.LOG_ENTRY_CHECKSUM_OFFSET : c.LOG_ENTRY_CHECKSUM_OFFSET + 4] = bytes(4)
        crc = crc32c(piece, crc)
        done += n
    return crc == stored


def parse_entry(reader: LogReader, log_offset: int, log_guid: uuid.UUID) -> LogEntry | None:
    """Return the entry at ``log_offset`` if it is valid per §2.3.2, else None.

    Rules: signature ``loge``; EntryLength a non-zero multiple of 4 KiB and no larger than the log; Tail a
    multiple of 4 KiB inside the log; SequenceNumber non-zero; LogGuid equal to the header's; descriptors fit
    in the entry; every descriptor has a known signature, the entry's sequence number and 4 KiB-aligned
    offsets; every data sector has ``data`` and the entry's sequence number; CRC-32C over the entry matches.
    The cheap structural rules come before the checksum, and every 4 KiB slot inside a structurally valid entry
    starts with ``desc``, ``zero`` or ``data``, so such entries never overlap: a scan reads each byte of the
    log a bounded number of times.
    """
    size = reader.size
    head_raw = reader.read(log_offset, c.LOG_ENTRY_HEADER_SIZE)
    if head_raw[:4] != c.LOG_ENTRY_SIGNATURE or head_raw[32:48] != log_guid.bytes_le:
        return None
    head = np.frombuffer(head_raw, dtype=layouts.LOG_ENTRY_HEADER_DTYPE)[0]
    length, tail, sequence = int(head["entry_length"]), int(head["tail"]), int(head["sequence_number"])
    count = int(head["descriptor_count"])
    if length == 0 or length % SECTOR or length > size or tail % SECTOR or tail >= size or sequence == 0:
        return None
    desc_sectors = descriptor_sectors(count)
    if desc_sectors * SECTOR > length:
        return None
    data_count = 0
    for _, d in _descriptor_chunks(reader, log_offset, count):
        is_zero = d["signature"] == c.ZERO_DESCRIPTOR_SIGNATURE
        is_data = d["signature"] == c.DATA_DESCRIPTOR_SIGNATURE
        if not (is_zero | is_data).all() or (d["sequence_number"] != sequence).any() \
                or (d["file_offset"] % SECTOR).any() or (d["middle"][is_zero] % SECTOR).any():
            return None
        data_count += int(is_data.sum())
        if (desc_sectors + data_count) * SECTOR > length:
            return None
    if (desc_sectors + data_count) * SECTOR != length:
        return None
    if not _data_sectors_ok(reader, log_offset + desc_sectors * SECTOR, data_count, sequence):
        return None
    if not _entry_checksum_ok(reader, log_offset, length, int(head["checksum"])):
        return None
    return LogEntry(log_offset, sequence, tail, length, int(head["flushed_file_offset"]),
                    int(head["last_file_offset"]), log_guid, count, data_count)


def _signed_slots(reader: LogReader, log_guid: uuid.UUID) -> list[int]:
    """Log positions of 4 KiB slots that start with ``loge`` and carry ``log_guid``, read CHUNK at a time."""
    sig = np.frombuffer(c.LOG_ENTRY_SIGNATURE, np.uint8)
    guid = np.frombuffer(log_guid.bytes_le, np.uint8)
    slots: list[int] = []
    start = _data_at_or_after(reader, 0)
    while start < reader.size:
        n = min(CHUNK, reader.size - start)
        raw = np.frombuffer(reader.read(start, n), dtype=np.uint8)
        sectors = raw[: n // SECTOR * SECTOR].reshape(-1, SECTOR)
        hit = (sectors[:, :4] == sig).all(axis=1) & (sectors[:, 32:48] == guid).all(axis=1)
        slots.extend((start + np.flatnonzero(hit) * SECTOR).tolist())
        start = _data_at_or_after(reader, start + n)
    return slots


def _data_at_or_after(reader: LogReader, start: int) -> int:
    """The first 4 KiB slot at or after ``start`` the file holds data for: holes read as zeros and hold no entry.

    Skipping them with SEEK_DATA makes a sparse 4 GiB log cost what its entries cost. Without SEEK_DATA (or a
    real descriptor) every slot is scanned.
    """
    fd = reader.io.fd
    if start >= reader.size or fd is None or not hasattr(os, "SEEK_DATA"):
        return start
    try:
        found = os.lseek(fd, reader.log_offset + start, os.SEEK_DATA) - reader.log_offset
    except OSError as exc:
        return reader.size if exc.errno == errno.ENXIO else start  # ENXIO: nothing but a hole follows
    return max(start, found // SECTOR * SECTOR)


def find_active_sequence(entries: dict[int, LogEntry], size: int) -> tuple[LogEntry, ...]:
    """The valid sequence whose head has the highest sequence number (§2.3.3), or () if none; linear time.

    A sequence is a run of entries laid end to end, each numbered one more than the one before, no longer than
    the log; it is valid when the Tail of its last entry (its head) is one of its own entries. Each entry has at
    most one follower, so every run ends at one head: walking the entries from the highest number down gives
    each one its head and the bytes up to it, and a head is a candidate when its Tail reaches it.
    """
    follower: dict[int, int] = {}
    for pos, e in entries.items():
        nxt = entries.get((pos + e.entry_length) % size)
        if nxt is not None and nxt.sequence_number == e.sequence_number + 1:
            follower[pos] = nxt.log_offset
    head_of: dict[int, int] = {}
    span: dict[int, int] = {}  # bytes from the entry to its head, both included
    for e in sorted(entries.values(), key=lambda x: x.sequence_number, reverse=True):
        f = follower.get(e.log_offset)
        head_of[e.log_offset] = e.log_offset if f is None else head_of[f]
        span[e.log_offset] = e.entry_length + (0 if f is None else span[f])
    best: LogEntry | None = None
    for pos, head in entries.items():
        if head_of[pos] != pos or head.tail not in entries:
            continue
        if head_of[head.tail] == pos and span[head.tail] <= size and (
                best is None or head.sequence_number > best.sequence_number):
            best = head
    if best is None:
        return ()
    seq, pos = [], best.tail
    while True:
        seq.append(entries[pos])
        if pos == best.log_offset:
            return tuple(seq)
        pos = follower[pos]


@dataclass
class ReplayPlan:
    """What a replay writes: the latest image of each target sector, zero ranges, the size the file reaches.

    Sector images stay in the log: ``sectors`` maps a target offset to where its descriptor and data sector lie
    (log positions), and ``sector`` reads one when it is written or patched into a read.
    """

    reader: LogReader | None = None
    sources: dict[int, tuple[int, int]] = field(default_factory=dict)  # target -> (descriptor pos, data pos)
    zeros: list[tuple[int, int]] = field(default_factory=list)
    min_file_size: int = 0

    @property
    def write_count(self) -> int:
        return len(self.sources) + len(self.zeros)

    def sector(self, target: int) -> bytes:
        desc_pos, data_pos = self.sources[target]
        desc = self.reader.read(desc_pos, c.LOG_DESCRIPTOR_SIZE)
        data = self.reader.read(data_pos, SECTOR)
        return desc[8:16] + data[8 : SECTOR - 4] + desc[4:8]


class PlannedSectors(Mapping):
    """Target offset -> 4 KiB sector image, read from the log on demand (what an Overlay patches reads with)."""

    def __init__(self, plan: ReplayPlan) -> None:
        self._plan = plan

    def __getitem__(self, target: int) -> bytes:
        return self._plan.sector(target)

    def __iter__(self):
        return iter(self._plan.sources)

    def __len__(self) -> int:
        return len(self._plan.sources)


def plan_replay(reader: LogReader, sequence: tuple[LogEntry, ...], bounds: LogBounds
                ) -> tuple[ReplayPlan, LogViolation | None]:
    """Validate every write of the sequence against ``bounds`` and fold it into a plan: later writes win.

    The first write no log may make stops the fold and is returned as the violation (the plan is then not to
    be used). Memory grows with the number of distinct targets, never with the log's length.
    """
    from vhdx.structures.log_rules import align, target_problem  # noqa: PLC0415 - dirty logs only (start-up cost)

    plan = ReplayPlan(reader)
    order: dict[int, int] = {}  # target -> index of its latest data write
    zeros: list[tuple[int, int, int]] = []  # (offset, end, index)
    k = 0
    for entry in sequence:
        where = bounds.log_offset + entry.log_offset
        data_pos = entry.log_offset + descriptor_sectors(entry.descriptor_count) * SECTOR
        for first, d in _descriptor_chunks(reader, entry.log_offset, entry.descriptor_count):
            is_data = d["signature"] == c.DATA_DESCRIPTOR_SIGNATURE
            lengths = np.where(is_data, SECTOR, d["middle"]).astype(object)
            for i, (is_d, offset, length) in enumerate(zip(is_data.tolist(), d["file_offset"].tolist(),
                                                           lengths.tolist(), strict=True)):
                problem = target_problem(offset, length, bounds, data=is_d)
                if problem:
                    kind = "data" if is_d else "zero"
                    return plan, LogViolation(where, f"log entry {entry.sequence_number}, {kind} descriptor "
                                                     f"{first + i}: {problem}")
                if is_d:
                    desc_pos = entry.log_offset + c.LOG_ENTRY_HEADER_SIZE + (first + i) * c.LOG_DESCRIPTOR_SIZE
                    plan.sources[offset] = (desc_pos % reader.size, data_pos % reader.size)
                    order[offset] = k
                    data_pos += SECTOR
                elif length:
                    zeros.append((offset, offset + length, k))
                k += 1
    head = sequence[-1] if sequence else None
    if head is not None and head.last_file_offset > bounds.end:
        return plan, LogViolation(bounds.log_offset + head.log_offset,
                                  f"log entry {head.sequence_number}: LastFileOffset {head.last_file_offset:#x} is "
                                  f"past {bounds.end:#x}, the largest file this layout can need")
    for target in _hidden_by_later_zeros(order, zeros):
        del plan.sources[target]
    plan.zeros = _union(zeros)
    if head is not None:
        last = max(head.last_file_offset, max((o + SECTOR for o in plan.sources), default=0),
                   max((o + n for o, n in plan.zeros), default=0))
        plan.min_file_size = align(last)
    return plan, None


def _hidden_by_later_zeros(order: dict[int, int], zeros: list[tuple[int, int, int]]) -> list[int]:
    """Targets whose latest data write is followed by a zero range over it; each target is visited once."""
    if not zeros or not order:
        return []
    targets = np.array(sorted(order), dtype=np.int64)
    hidden_at = np.full(len(targets), -1, dtype=np.int64)  # index of the latest zero range over each target
    next_free = list(range(len(targets) + 1))  # union-find: the next target not yet given a zero range

    def find(i: int) -> int:
        root = i
        while next_free[root] != root:
            root = next_free[root]
        while next_free[i] != root:
            next_free[i], i = root, next_free[i]
        return root

    for lo, hi, k in sorted(zeros, key=lambda z: z[2], reverse=True):
        i = find(int(np.searchsorted(targets, lo)))
        stop = int(np.searchsorted(targets, hi))
        while i < stop:
            hidden_at[i] = k
            next_free[i] = i + 1
            i = find(i + 1)
    written_at = np.array([order[t] for t in targets.tolist()], dtype=np.int64)
    return targets[hidden_at > written_at].tolist()


def _union(zeros: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Zero ranges as disjoint (offset, length) pairs: their order no longer matters once sectors are folded."""
    out: list[list[int]] = []
    for lo, hi, _ in sorted(zeros):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi - lo) for lo, hi in out]


@dataclass(frozen=True)
class LogState:
    """What the log of a file holds, as seen by a reader."""

    log_offset: int
    log_length: int
    log_guid: uuid.UUID
    sequence: tuple[LogEntry, ...] = ()
    problem: str | None = None  # why no sequence could be replayed, when the log is dirty
    violation: LogViolation | None = None  # a write of the active sequence that no log may make
    plan: ReplayPlan | None = None  # the validated replay, when there is one
    torn: tuple[int, ...] = ()  # log positions of entries with the current GUID that are not valid

    @property
    def is_dirty(self) -> bool:
        return self.log_guid != c.ZERO_GUID

    @property
    def needs_replay(self) -> bool:
        return self.is_dirty and bool(self.sequence)

    def problems(self, in_use: bool = False) -> list[Problem]:
        """What a dirty log means (§2.3.3); ``in_use``: a live writer's log (how it works, not damage)."""
        if not self.is_dirty:
            return []
        at = self.log_offset
        out = [Problem(Code.LOG_TORN_ENTRY, "Log entry", at + pos, "an entry with the current log GUID is incomplete "
                       "or fails its checksum (never applied)", Severity.WARNING, True, False) for pos in self.torn]
        if not self.sequence:
            return [*out, Problem(Code.LOG_NO_VALID_SEQUENCE, "Log", at, f"the header names log GUID {self.log_guid} "
                                  "but no complete log sequence exists (nothing to replay)", Severity.WARNING, True,
                                  False)]
        first, head = self.sequence[0], self.sequence[-1]
        if self.violation is not None:
            return [*out, Problem(Code.LOG_INVALID, "Log entry", self.violation.entry_offset,
                                  f"invalid log: {self.violation.message}; the log is not replayed (not even in "
                                  "memory) and no repair replays it")]
        if self.problem:
            return [*out, Problem(Code.LOG_TRUNCATED, "Log", at + head.log_offset, self.problem)]
        entries = (f"{len(self.sequence)} log entr{'y' if len(self.sequence) == 1 else 'ies'} (sequence "
                   f"{first.sequence_number}..{head.sequence_number})")
        if in_use:
            return [*out, Problem(Code.LOG_IN_USE, "Log", at + first.log_offset, f"{entries} of the process writing "
                                  "the file; replayed in memory to check the structures below", Severity.INFO,
                                  refuses_open=False)]
        return [*out, Problem(Code.LOG_DIRTY, "Log", at + first.log_offset, f"{entries} must be replayed; structures "
                              "below are checked as replayed", repairable=True, refuses_open=False)]

    def refusal(self, path: str | None = None) -> FormatError | None:
        """The error that stops any replay of this log (in memory or on disk), or None when it may be replayed."""
        problem = next((p for p in self.problems() if p.refuses_open), None)
        return None if problem is None else FormatError.from_problem(problem, path)


def read_log(io: ImageIO, log_offset: int, log_length: int, log_guid: uuid.UUID) -> LogState:
    """Find, validate and plan what must be replayed (nothing if LogGuid is zero), reading the log in pieces."""
    if log_guid == c.ZERO_GUID:
        return LogState(log_offset, log_length, log_guid)
    if log_length == 0:
        return LogState(log_offset, log_length, log_guid, problem="log GUID set but log length is 0")
    for problem in log_placement_problems(log_offset, log_length, log_guid, io.size, "Log", log_offset):
        raise FormatError.from_problem(problem, io.path)
    reader = LogReader(io, log_offset, log_length)
    entries: dict[int, LogEntry] = {}
    torn = []
    for slot in _signed_slots(reader, log_guid):
        entry = parse_entry(reader, slot, log_guid)
        if entry is None:
            torn.append(slot)
        else:
            entries[slot] = entry
    sequence = find_active_sequence(entries, log_length)
    torn_slots = tuple(torn)
    if not sequence:
        return LogState(log_offset, log_length, log_guid, problem="log GUID set but no valid log sequence",
                        torn=torn_slots)
    head = sequence[-1]
    from vhdx.structures.log_rules import log_bounds, region_table_problem  # noqa: PLC0415 - dirty logs only

    plan, violation = plan_replay(reader, sequence, log_bounds(io, log_offset, log_length))
    if violation is None and (problem := region_table_problem(io, plan)):
        violation = LogViolation(log_offset + head.log_offset, f"log entry {head.sequence_number}: {problem}")
    if violation is not None:
        return LogState(log_offset, log_length, log_guid, sequence, violation=violation, torn=torn_slots)
    if io.real_size < head.flushed_file_offset:
        return LogState(log_offset, log_length, log_guid, sequence,
                        problem=f"file is shorter ({io.real_size}) than the log's FlushedFileOffset "
                        f"({head.flushed_file_offset}): truncated", torn=torn_slots)
    return LogState(log_offset, log_length, log_guid, sequence, plan=plan, torn=torn_slots)


def overlay_for(plan: ReplayPlan) -> Overlay:
    """An in-memory view of the replay for read-only opens (nothing is written; sectors are read from the log)."""
    # Data sectors written after a zero range sit in plan.sources and win, because Overlay patches zeros first.
    return Overlay(sectors=PlannedSectors(plan), zeros=list(plan.zeros), file_size=plan.min_file_size)


def apply_replay(io: ImageIO, plan: ReplayPlan) -> None:
    """Write a validated replay plan to the file and flush. The caller resets the header's LogGuid afterwards.

    Zero ranges are written a piece at a time and only where the file has bytes: past its end, growing the file
    gives zeros, so a replay never writes (or holds in memory) more than the file and one piece.
    """
    size = io.real_size
    zeros = bytes(CHUNK)
    for offset, length in plan.zeros:
        end = min(offset + length, size)
        for pos in range(offset, end, CHUNK):
            io.write_at(pos, memoryview(zeros)[: min(CHUNK, end - pos)])
    for offset in sorted(plan.sources):
        io.write_at(offset, plan.sector(offset))
    if io.real_size < plan.min_file_size:
        io.truncate(plan.min_file_size)
    io.flush()


# Building entries is for writers only (vhdx.structures.log_build): readers, which import this module, do not pay
# for its data classes at start-up. The names stay reachable here.
_BUILDING = ("DataWrite", "ZeroWrite", "build_entry")


def __getattr__(name: str) -> object:
    if name in _BUILDING:
        from vhdx.structures import log_build  # noqa: PLC0415 - writers only (start-up cost of readers)

        return getattr(log_build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
