"""The two headers: load both, decide which is current, and write updates the two-copy way.

Rules for the current header (checked in this order): the signature must be ``head``, the CRC-32C over the
whole 4 KiB must match, Version must be 1; of the valid copies the higher SequenceNumber wins. Equal sequence
numbers are accepted only when both 4 KiB copies are byte-identical (Disk2VHD writes such files).

References: [MS-VHDX] §2.2.2, §2.2.2.1.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import cast

from vhdx.errors import ChecksumError, FormatError
from vhdx.findings import Code, Problem, Severity
from vhdx.format import checksum, layouts
from vhdx.format import constants as c
from vhdx.io import ImageIO, parse_bytes


@dataclass(frozen=True)
class Header:
    """One parsed header copy."""

    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_version: int
    version: int
    log_length: int
    log_offset: int
    checksum: int = 0

    @property
    def log_is_empty(self) -> bool:
        return self.log_guid == c.ZERO_GUID

    def to_bytes(self) -> bytes:
        """The 4 KiB on-disk form with a fresh checksum (reserved bytes zero)."""
        buf = bytearray(
            layouts.Header.build(
                {
                    "checksum": 0,
                    "sequence_number": self.sequence_number,
                    "file_write_guid": self.file_write_guid,
                    "data_write_guid": self.data_write_guid,
                    "log_guid": self.log_guid,
                    "log_version": self.log_version,
                    "version": self.version,
                    "log_length": self.log_length,
                    "log_offset": self.log_offset,
                }
            )
        )
        checksum.stamp(buf, c.HEADER_CHECKSUM_OFFSET)
        return bytes(buf)


@dataclass(frozen=True)
class HeaderCopy:
    """What lies in one header slot, valid or not, and why not."""

    index: int  # 0 for Header 1, 1 for Header 2
    offset: int
    raw: bytes
    header: Header | None
    problem: str | None  # None when the copy is valid
    code: Code | None = None  # the rule the copy breaks (None when valid)

    @property
    def valid(self) -> bool:
        return self.problem is None

    @property
    def name(self) -> str:
        return f"Header {self.index + 1}"

    @property
    def parsed(self) -> Header:
        """The header of a valid copy (an invalid copy has none)."""
        if self.header is None:
            raise ValueError(f"{self.name} holds no valid header")
        return self.header


@dataclass(frozen=True)
class HeaderSet:
    """Both header copies and which one is current."""

    copies: tuple[HeaderCopy, ...]  # always two: Header 1, Header 2
    current_index: int

    @property
    def current(self) -> Header:
        return cast(Header, self.copies[self.current_index].header)  # the current copy is valid, hence parsed

    @property
    def current_copy(self) -> HeaderCopy:
        return self.copies[self.current_index]

    @property
    def other_copy(self) -> HeaderCopy:
        return self.copies[1 - self.current_index]


def parse_header_copy(raw: bytes, index: int) -> HeaderCopy:
    """Judge one 4 KiB header slot: signature, then checksum, then version."""
    offset = c.HEADER_OFFSETS[index]
    if len(raw) < c.HEADER_SIZE:
        return HeaderCopy(index, offset, raw, None, "truncated", Code.HEADER_SIGNATURE)
    if raw[: len(c.HEADER_SIGNATURE)] != c.HEADER_SIGNATURE:
        return HeaderCopy(index, offset, raw, None, f"bad signature {raw[:4]!r}", Code.HEADER_SIGNATURE)
    parsed = parse_bytes(layouts.Header, raw, offset=offset, structure=f"Header {index + 1}")
    header = Header(
        sequence_number=parsed.sequence_number,
        file_write_guid=parsed.file_write_guid,
        data_write_guid=parsed.data_write_guid,
        log_guid=parsed.log_guid,
        log_version=parsed.log_version,
        version=parsed.version,
        log_length=parsed.log_length,
        log_offset=parsed.log_offset,
        checksum=parsed.checksum,
    )
    if not checksum.verify(raw, c.HEADER_CHECKSUM_OFFSET):
        computed = checksum.crc32c_of(raw, c.HEADER_CHECKSUM_OFFSET)
        return HeaderCopy(index, offset, raw, header, f"checksum {parsed.checksum:#010x} != computed {computed:#010x}",
                          Code.HEADER_CHECKSUM)
    if parsed.version != c.HEADER_VERSION:
        return HeaderCopy(index, offset, raw, header, f"version {parsed.version} (only 1 is defined)",
                          Code.HEADER_VERSION)
    return HeaderCopy(index, offset, raw, header, None)


def choose_current(copies: tuple[HeaderCopy, ...]) -> int | None:
    """Index of the current header, or None when there is none (no valid copy, or an ambiguous tie)."""
    valid = [copy for copy in copies if copy.valid]
    if not valid:
        return None
    if len(valid) == 1:
        return valid[0].index
    first, second = (cast(Header, copy.header) for copy in copies)  # both valid, hence parsed
    if first.sequence_number == second.sequence_number:
        return 0 if copies[0].raw == copies[1].raw else None
    return 0 if first.sequence_number > second.sequence_number else 1


def _content(h: Header) -> tuple:
    return (h.file_write_guid, h.data_write_guid, h.log_guid, h.log_version, h.version, h.log_length, h.log_offset)


def log_placement_problems(log_offset: int, log_length: int, log_guid, file_size: int, structure: str,
                           offset: int) -> list[Problem]:
    """Rules on where the header puts the log (§2.2.2): 1 MiB aligned, after the header section, inside the file.

    Only a log that must be read (LogGuid set, length not 0) stops the reader; check reports every misplaced log.
    """
    if not log_length and log_guid == c.ZERO_GUID:
        return []
    in_use = log_guid != c.ZERO_GUID and log_length != 0
    if log_offset % c.ALIGNMENT or log_length % c.ALIGNMENT or log_offset < c.HEADER_SECTION_SIZE or not log_length:
        return [Problem(Code.HEADER_LOG_PLACEMENT, structure, offset,
                        f"log at {log_offset:#x} length {log_length:#x} is not 1 MiB aligned after the header "
                        "section", refuses_open=in_use)]
    if log_offset + log_length > file_size:
        return [Problem(Code.FILE_TRUNCATED, "Log", log_offset,
                        f"the log ends at {log_offset + log_length:#x} but the file at {file_size:#x}",
                        refuses_open=in_use)]
    return []


def header_problems(copies: tuple[HeaderCopy, HeaderCopy], file_size: int) -> list[Problem]:
    """Every rule the two header copies break (§2.2.2, §2.2.2.1), in the order check reports them.

    A damaged copy beside a valid current one is repairable and does not stop the reader; no current header,
    a current header with an unknown log version or a misplaced log in use does.
    """
    problems = []
    index = choose_current(copies)
    for copy in copies:
        if not copy.valid:
            twin_ok = index is not None
            problems.append(Problem(cast(Code, copy.code), copy.name, copy.offset,
                                    (copy.problem or "") + ("; the other copy is valid and current" if twin_ok else ""),
                                    repairable=twin_ok, refuses_open=False))
        elif copy.parsed.log_version != c.LOG_VERSION:
            in_use = copy.index == index and not copy.parsed.log_is_empty
            problems.append(Problem(Code.HEADER_VERSION, copy.name, copy.offset,
                                    f"log version {copy.parsed.log_version} (only 0 is defined)",
                                    refuses_open=in_use))
    if index is None:
        if all(copy.valid for copy in copies):
            message = f"both headers have sequence number {copies[0].parsed.sequence_number} but differ"
        else:
            message = f"no valid header (Header 1: {copies[0].problem}; Header 2: {copies[1].problem})"
        problems.append(Problem(Code.HEADER_NO_CURRENT, "Header 1", copies[0].offset, message))
        return problems
    current, other = copies[index], copies[1 - index]
    if other.valid:
        if other.parsed.sequence_number == current.parsed.sequence_number:
            problems.append(Problem(Code.HEADER_SEQUENCE_TIE, other.name, other.offset,
                                    f"both headers are identical with sequence number "
                                    f"{current.parsed.sequence_number}", Severity.WARNING, refuses_open=False))
        elif _content(other.parsed) != _content(current.parsed):
            # Normal: the update protocol writes the two copies alternately, so the other one is one step behind.
            problems.append(Problem(Code.HEADER_STALE, other.name, other.offset,
                                    f"the older copy (sequence number {other.parsed.sequence_number}, current "
                                    f"{current.parsed.sequence_number}), as every header update leaves it",
                                    Severity.INFO, refuses_open=False))
    h = current.parsed
    problems.extend(log_placement_problems(h.log_offset, h.log_length, h.log_guid, file_size, current.name,
                                           current.offset))
    return problems


def refusal(problems: list[Problem]) -> Problem | None:
    """The first problem that stops the reader, or None."""
    return next((p for p in problems if p.refuses_open), None)


def read_header_copies(io: ImageIO, *, exact: bool = True) -> tuple[HeaderCopy, HeaderCopy]:
    """Both 4 KiB header slots as parsed copies (``exact``: a short file is an error, else a short copy)."""
    copies = []
    for i, offset in enumerate(c.HEADER_OFFSETS):
        raw = io.read_exact_at(offset, c.HEADER_SIZE, f"Header {i + 1}") if exact else io.read_at(offset, c.HEADER_SIZE)
        copies.append(parse_header_copy(raw, i))
    return copies[0], copies[1]


def load_headers(io: ImageIO) -> HeaderSet:
    """Read both headers and pick the current one; raise the first rule that stops the reader."""
    copies = read_header_copies(io)
    problem = refusal(header_problems(copies, io.size))
    # A misplaced log is the log reader's to refuse (it knows whether the log must be read).
    if problem is not None and problem.code not in (Code.HEADER_LOG_PLACEMENT, Code.FILE_TRUNCATED):
        # No current header because every copy fails its CRC-32C: a checksum error (with the finding's code).
        crc = all(copy.code == Code.HEADER_CHECKSUM for copy in copies)
        raise (ChecksumError if crc else FormatError).from_problem(problem, io.path)
    return HeaderSet(copies, cast(int, choose_current(copies)))  # a current copy exists: no refusal above


def write_header_update(io: ImageIO, headers: HeaderSet, new: Header) -> HeaderSet:
    """Write ``new`` (sequence number = current + 1) over the non-current copy, flush: it becomes current.

    This is the spec's single atomic step; callers that want both copies current call it twice.
    """
    target = headers.other_copy
    new = replace(new, sequence_number=headers.current.sequence_number + 1)
    raw = new.to_bytes()
    io.write_at(target.offset, raw)
    io.flush()
    copies = list(headers.copies)
    copies[target.index] = parse_header_copy(raw, target.index)
    return HeaderSet(tuple(copies), target.index)


def write_both_headers(io: ImageIO, headers: HeaderSet, new: Header) -> HeaderSet:
    """Update twice so that both copies hold the new content (spec SHOULD, as QEMU does)."""
    headers = write_header_update(io, headers, new)
    return write_header_update(io, headers, headers.current)
