"""The one crash-safe way metadata changes reach the file: through the log (and its replay).

Commit protocol for whole 4 KiB sectors (§2.3; every writer of metadata uses ``commit_through_log``):
1. flush the payload written so far (metadata must never point at bytes that are not durable); the first
   commit of a session leaves this to step 2's flush, as its entry is not live before step 3;
2. write the log entry (header, descriptors, data sectors, checksum) and flush;
3. the header names the entry's LogGuid (first entry of a session only; a header update flushes);
4. write the sectors in place and flush;
5. when the session ends, clear the LogGuid in the header (``empty_log``).

A log entry is written while the header still names no log (or an earlier, fully applied one of this session):
a crash before step 3 leaves the file unchanged and its log ignored. From step 3 on, opening replays the entry,
which writes the same sectors again. So a crash anywhere leaves the old or the new sectors, never a mix.

Header updates: each writes the non-current copy and flushes (``header.write_header_update``). Both copies get the
final content at the end of a session (``settle_headers``), not after every step: the second copy is rewritten
once, when the session's last update has been made (spec SHOULD, without an fsync per step).

References: [MS-VHDX] §2.2.2.1 (header update), §2.3 (log), §2.3.3 (replay).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from vhdx.errors import VhdxError
from vhdx.format import constants as c
from vhdx.structures.bat import ceil_div
from vhdx.structures.header import HeaderSet, write_header_update
from vhdx.structures.log import SECTOR, LogState, apply_replay, descriptor_sectors
from vhdx.structures.log_build import DataWrite, build_entry

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from vhdx.io import ImageIO


@dataclass
class LogCursor:
    """Where a session's next log entry goes: its LogGuid (None before the first), last sequence number, position."""

    guid: uuid.UUID | None = None
    sequence: int = 0
    position: int = 0


def max_entry_sectors(log_length: int) -> int:
    """Most data sectors one log entry may carry in a log of ``log_length`` bytes (one sector kept free)."""
    room = log_length // SECTOR - 1
    n = room
    while n > 0 and n + descriptor_sectors(n) > room:
        n -= 1
    return n


def commit_through_log(io: ImageIO, headers: HeaderSet, writes: Sequence[DataWrite], *,
                       cursor: LogCursor | None = None, new_guid: Callable[[], uuid.UUID] = uuid.uuid4,
                       flush_payload: bool = True, start_session: bool = False,
                       empty_after: bool = False) -> HeaderSet:
    """Write whole 4 KiB sectors crash-safely (the protocol in the module docstring); returns the headers now.

    The session must have started (the header's new FileWriteGuid written) before this is called. ``writes`` that
    do not fit one entry are split into several, each applied and flushed before the next is written (its log
    space is then free again). ``cursor`` carries the LogGuid and sequence between commits of one session (a fresh
    one when None); ``flush_payload`` is False only when nothing but metadata was written since the last flush.
    A one-commit session (a repair) passes ``start_session`` (the header gets a new FileWriteGuid first) and
    ``empty_after`` (the LogGuid is cleared at the end).
    """
    cursor = cursor if cursor is not None else LogCursor()
    h = headers.current
    per_entry = max_entry_sectors(h.log_length)
    if per_entry <= 0:
        raise VhdxError("the log is too small to hold an entry", structure="Log", offset=h.log_offset, path=io.path)
    if start_session:
        headers = write_header_update(io, headers, replace(h, file_write_guid=new_guid()))
    if flush_payload and headers.current.log_guid != c.ZERO_GUID:
        # The header names the log already: an entry is live (replayed) as soon as it is durable, so the payload
        # it maps must be durable first. Otherwise the entry's own flush covers both: it counts only later.
        io.flush()
    ordered = sorted(writes, key=lambda w: w.file_offset)
    for i in range(0, len(ordered), per_entry):
        headers = _commit_entry(io, headers, ordered[i : i + per_entry], cursor, new_guid)
    if empty_after:
        headers = empty_log(io, headers)
    return headers


def _commit_entry(io: ImageIO, headers: HeaderSet, writes: Sequence[DataWrite], cursor: LogCursor,
                  new_guid: Callable[[], uuid.UUID]) -> HeaderSet:
    h = headers.current
    if cursor.guid is None:
        cursor.guid, cursor.sequence, cursor.position = new_guid(), 0, 0
    cursor.sequence += 1
    length = (descriptor_sectors(len(writes)) + len(writes)) * SECTOR
    if cursor.position + length > h.log_length:
        cursor.position = 0  # earlier entries are applied and flushed: their space is free again
    size = ceil_div(io.real_size, c.ALIGNMENT) * c.ALIGNMENT
    entry = build_entry(list(writes), sequence_number=cursor.sequence, log_guid=cursor.guid, tail=cursor.position,
                        flushed_file_offset=size, last_file_offset=size)
    io.write_at(h.log_offset + cursor.position, entry)
    io.flush()
    if h.log_guid != cursor.guid:
        # The entry exists before the header names it: a crash in between leaves the log ignored.
        headers = write_header_update(io, headers, replace(h, log_guid=cursor.guid))
    for write in writes:
        io.write_at(write.file_offset, write.data)
    io.flush()
    cursor.position += length
    return headers


def settle_headers(io: ImageIO, headers: HeaderSet) -> HeaderSet:
    """Give the other header copy the current content too, when it differs (both copies current, spec SHOULD)."""
    other = headers.other_copy
    if other.valid and replace(other.header, sequence_number=0, checksum=0) == replace(
            headers.current, sequence_number=0, checksum=0):
        return headers
    return write_header_update(io, headers, headers.current)


def empty_log(io: ImageIO, headers: HeaderSet, **changes) -> HeaderSet:
    """Mark the log empty (LogGuid zero) in both copies, with any other header ``changes`` (a new FileWriteGuid).

    Call only once every entry of the log has been applied and flushed: nothing is left to replay.
    """
    if headers.current.log_guid != c.ZERO_GUID or changes:
        headers = write_header_update(io, headers, replace(headers.current, log_guid=c.ZERO_GUID, **changes))
    return settle_headers(io, headers)


def replay_log_on_disk(io: ImageIO, headers: HeaderSet, log: LogState) -> HeaderSet:
    """Replay a dirty log into the file (writable opens and ``repair``), then mark the log empty.

    The header gets a new FileWriteGuid before the first replayed byte is written, as §2.2.2 requires.
    """
    refusal = log.refusal(io.path)
    if refusal is not None:  # validated before the first byte changes: a hostile log writes nothing
        raise refusal
    headers = write_header_update(io, headers, replace(headers.current, file_write_guid=uuid.uuid4()))
    apply_replay(io, log.plan)
    return empty_log(io, headers)
