"""The metadata log: parse, validate, find the active sequence, replay, and build entries for writers.

Pure functions (``parse_entry``, ``find_active_sequence``, ``plan_replay``, ``build_entry``) are kept apart
from the ones that touch a file (``read_log``, ``apply_replay``).

References: [MS-VHDX] §2.3 (log), §2.3.1 (entry, descriptors, data sector), §2.3.2 (entry validity),
§2.3.3 (log replay).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from vhdx.errors import FormatError
from vhdx.format import checksum, layouts
from vhdx.format import constants as c
from vhdx.io import ImageIO, Overlay, parse_bytes

SECTOR = c.LOG_SECTOR_SIZE


@dataclass(frozen=True)
class DataWrite:
    """A data descriptor with its reassembled 4 KiB target sector."""

    file_offset: int
    data: bytes


@dataclass(frozen=True)
class ZeroWrite:
    file_offset: int
    length: int


@dataclass(frozen=True)
class LogEntry:
    """One valid log entry."""

    log_offset: int  # offset of the entry inside the log
    sequence_number: int
    tail: int
    entry_length: int
    flushed_file_offset: int
    last_file_offset: int
    log_guid: uuid.UUID
    writes: tuple[DataWrite | ZeroWrite, ...]


@dataclass(frozen=True)
class LogState:
    """What the log of a file holds, as seen by a reader."""

    log_offset: int
    log_length: int
    log_guid: uuid.UUID
    sequence: tuple[LogEntry, ...] = ()
    problem: str | None = None  # why no sequence could be replayed, when the log is dirty

    @property
    def is_dirty(self) -> bool:
        return self.log_guid != c.ZERO_GUID

    @property
    def needs_replay(self) -> bool:
        return self.is_dirty and bool(self.sequence)


def descriptor_sectors(descriptor_count: int) -> int:
    """4 KiB sectors holding the header and ``descriptor_count`` descriptors (never 0)."""
    return -(-(descriptor_count + 2) // c.DESCRIPTORS_PER_SECTOR)


def _ring_read(log: bytes, start: int, length: int) -> bytes:
    """Read ``length`` bytes from the circular log starting at ``start`` (wrapping around the end)."""
    size = len(log)
    start %= size
    if start + length <= size:
        return log[start : start + length]
    first = log[start:]
    return first + log[: length - len(first)]


def parse_entry(log: bytes, log_offset: int, log_guid: uuid.UUID) -> LogEntry | None:
    """Return the entry at ``log_offset`` if it is valid per §2.3.2, else None.

    Rules: signature ``loge``; EntryLength a non-zero multiple of 4 KiB and no larger than the log; Tail a
    multiple of 4 KiB inside the log; SequenceNumber non-zero; LogGuid equal to the header's; descriptors fit
    in the entry; every descriptor has a known signature, the entry's sequence number and 4 KiB-aligned
    offsets; every data sector has ``data`` and the entry's sequence number; CRC-32C over the entry matches.
    """
    size = len(log)
    head_raw = _ring_read(log, log_offset, c.LOG_ENTRY_HEADER_SIZE)
    if head_raw[:4] != c.LOG_ENTRY_SIGNATURE:
        return None
    head = parse_bytes(layouts.LogEntryHeader, head_raw)
    length = head.entry_length
    if length == 0 or length % SECTOR or length > size or head.tail % SECTOR or head.tail >= size:
        return None
    if head.sequence_number == 0 or head.log_guid != log_guid:
        return None
    desc_sectors = descriptor_sectors(head.descriptor_count)
    if desc_sectors * SECTOR > length:
        return None
    raw = _ring_read(log, log_offset, length)
    if not checksum.verify(raw, c.LOG_ENTRY_CHECKSUM_OFFSET):
        return None
    writes: list[DataWrite | ZeroWrite] = []
    data_index = 0
    for i in range(head.descriptor_count):
        pos = c.LOG_ENTRY_HEADER_SIZE + i * c.LOG_DESCRIPTOR_SIZE
        desc_raw = raw[pos : pos + c.LOG_DESCRIPTOR_SIZE]
        if desc_raw[:4] == c.ZERO_DESCRIPTOR_SIGNATURE:
            d = parse_bytes(layouts.ZeroDescriptor, desc_raw)
            if d.sequence_number != head.sequence_number or d.file_offset % SECTOR or d.zero_length % SECTOR:
                return None
            writes.append(ZeroWrite(d.file_offset, d.zero_length))
        elif desc_raw[:4] == c.DATA_DESCRIPTOR_SIGNATURE:
            d = parse_bytes(layouts.DataDescriptor, desc_raw)
            if d.sequence_number != head.sequence_number or d.file_offset % SECTOR:
                return None
            sector_pos = (desc_sectors + data_index) * SECTOR
            if sector_pos + SECTOR > length:
                return None
            sector = parse_bytes(layouts.DataSector, raw[sector_pos : sector_pos + SECTOR]) \
                if raw[sector_pos : sector_pos + 4] == c.DATA_SECTOR_SIGNATURE else None
            if sector is None or (sector.sequence_high << 32 | sector.sequence_low) != head.sequence_number:
                return None
            writes.append(DataWrite(d.file_offset, d.leading_bytes + sector.data + d.trailing_bytes))
            data_index += 1
        else:
            return None
    if (desc_sectors + data_index) * SECTOR != length:
        return None
    return LogEntry(log_offset, head.sequence_number, head.tail, length, head.flushed_file_offset,
                    head.last_file_offset, head.log_guid, tuple(writes))


def find_active_sequence(log: bytes, log_guid: uuid.UUID) -> tuple[LogEntry, ...]:
    """The valid sequence whose head has the highest sequence number (§2.3.3), or () if none.

    Every 4 KiB slot is tried as the start of a sequence; a sequence counts only if the Tail of its last
    entry points at one of its own entries.
    """
    size = len(log)
    if size == 0:
        return ()
    cache: dict[int, LogEntry | None] = {}

    def entry_at(pos: int) -> LogEntry | None:
        if pos not in cache:
            cache[pos] = parse_entry(log, pos, log_guid)
        return cache[pos]

    best: tuple[LogEntry, ...] = ()
    for start in range(0, size, SECTOR):
        first = entry_at(start)
        if first is None:
            continue
        seq = [first]
        pos = (start + first.entry_length) % size
        while len(seq) * SECTOR < size:
            nxt = entry_at(pos)
            if nxt is None or nxt.sequence_number != seq[-1].sequence_number + 1:
                break
            seq.append(nxt)
            pos = (pos + nxt.entry_length) % size
        head = seq[-1]
        tail_positions = [e.log_offset for e in seq]
        if head.tail not in tail_positions:
            continue
        active = tuple(seq[tail_positions.index(head.tail) :])
        if not best or active[-1].sequence_number > best[-1].sequence_number:
            best = active
    return best


def read_log(io: ImageIO, log_offset: int, log_length: int, log_guid: uuid.UUID) -> LogState:
    """Read the log region and find what must be replayed (nothing if LogGuid is zero)."""
    if log_guid == c.ZERO_GUID:
        return LogState(log_offset, log_length, log_guid)
    if log_length == 0:
        return LogState(log_offset, log_length, log_guid, problem="log GUID set but log length is 0")
    if log_offset % c.ALIGNMENT or log_length % c.ALIGNMENT or log_offset < c.HEADER_SECTION_SIZE:
        raise FormatError(f"log at {log_offset:#x} length {log_length:#x} is misplaced (1 MiB alignment, after "
                          "the header section)", structure="Log", offset=log_offset, path=io.path)
    raw = io.read_exact_at(log_offset, log_length, "Log")
    sequence = find_active_sequence(raw, log_guid)
    if not sequence:
        return LogState(log_offset, log_length, log_guid, problem="log GUID set but no valid log sequence")
    head = sequence[-1]
    if io.real_size < head.flushed_file_offset:
        return LogState(log_offset, log_length, log_guid, sequence,
                        problem=f"file is shorter ({io.real_size}) than the log's FlushedFileOffset "
                        f"({head.flushed_file_offset}): truncated")
    return LogState(log_offset, log_length, log_guid, sequence)


@dataclass
class ReplayPlan:
    """Sector images and zero ranges to write, in order, plus the size the file must reach."""

    sectors: dict[int, bytes] = field(default_factory=dict)
    zeros: list[tuple[int, int]] = field(default_factory=list)
    min_file_size: int = 0

    @property
    def write_count(self) -> int:
        return len(self.sectors) + len(self.zeros)


def plan_replay(sequence: tuple[LogEntry, ...]) -> ReplayPlan:
    """Fold a sequence into final sector images: later writes win over earlier ones (pure)."""
    plan = ReplayPlan()
    for entry in sequence:
        for write in entry.writes:
            if isinstance(write, DataWrite):
                plan.sectors[write.file_offset] = write.data
            else:
                end = write.file_offset + write.length
                # A later zero range hides earlier sector images it covers.
                for off in [o for o in plan.sectors if write.file_offset <= o < end]:
                    del plan.sectors[off]
                plan.zeros.append((write.file_offset, write.length))
    if sequence:
        head = sequence[-1]
        last = max(head.last_file_offset, max((o + SECTOR for o in plan.sectors), default=0),
                   max((o + n for o, n in plan.zeros), default=0))
        plan.min_file_size = -(-last // c.ALIGNMENT) * c.ALIGNMENT
    return plan


def overlay_for(plan: ReplayPlan) -> Overlay:
    """An in-memory view of the replay for read-only opens (nothing is written)."""
    # Data sectors written after a zero range sit in plan.sectors and win, because Overlay patches zeros first.
    return Overlay(sectors=dict(plan.sectors), zeros=list(plan.zeros), file_size=plan.min_file_size)


def apply_replay(io: ImageIO, plan: ReplayPlan) -> None:
    """Write a replay plan to the file and flush. The caller resets the header's LogGuid afterwards."""
    for offset, length in plan.zeros:
        io.write_at(offset, bytes(length))
    for offset in sorted(plan.sectors):
        io.write_at(offset, plan.sectors[offset])
    if io.real_size < plan.min_file_size:
        io.truncate(plan.min_file_size)
    io.flush()


def build_entry(
    writes: list[DataWrite | ZeroWrite],
    *,
    sequence_number: int,
    log_guid: uuid.UUID,
    tail: int,
    flushed_file_offset: int,
    last_file_offset: int,
) -> bytes:
    """Serialise one log entry (header, descriptors, data sectors) with its checksum."""
    descriptors = []
    data_sectors = []
    for write in writes:
        if isinstance(write, DataWrite):
            if len(write.data) != SECTOR or write.file_offset % SECTOR:
                raise ValueError("data writes must be whole 4 KiB sectors at 4 KiB offsets")
            descriptors.append(layouts.DataDescriptor.build({
                "trailing_bytes": write.data[-4:], "leading_bytes": write.data[:8],
                "file_offset": write.file_offset, "sequence_number": sequence_number}))
            data_sectors.append(layouts.DataSector.build({
                "sequence_high": sequence_number >> 32, "data": write.data[8:-4],
                "sequence_low": sequence_number & 0xFFFFFFFF}))
        else:
            descriptors.append(layouts.ZeroDescriptor.build({
                "reserved": 0, "zero_length": write.length, "file_offset": write.file_offset,
                "sequence_number": sequence_number}))
    desc_sectors = descriptor_sectors(len(descriptors))
    length = (desc_sectors + len(data_sectors)) * SECTOR
    head = layouts.LogEntryHeader.build({
        "checksum": 0, "entry_length": length, "tail": tail, "sequence_number": sequence_number,
        "descriptor_count": len(descriptors), "reserved": 0, "log_guid": log_guid,
        "flushed_file_offset": flushed_file_offset, "last_file_offset": last_file_offset})
    buf = bytearray(length)
    area = head + b"".join(descriptors)
    buf[: len(area)] = area
    pos = desc_sectors * SECTOR
    for sector in data_sectors:
        buf[pos : pos + SECTOR] = sector
        pos += SECTOR
    checksum.stamp(buf, c.LOG_ENTRY_CHECKSUM_OFFSET)
    return bytes(buf)
