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

from vhdx.errors import FormatError, UnsupportedError
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

    @property
    def valid(self) -> bool:
        return self.problem is None

    @property
    def name(self) -> str:
        return f"Header {self.index + 1}"


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
        return HeaderCopy(index, offset, raw, None, "truncated")
    if raw[:4] != c.HEADER_SIGNATURE:
        return HeaderCopy(index, offset, raw, None, f"bad signature {raw[:4]!r}")
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
        return HeaderCopy(index, offset, raw, header, f"checksum {parsed.checksum:#010x} != computed {computed:#010x}")
    if parsed.version != c.HEADER_VERSION:
        return HeaderCopy(index, offset, raw, header, f"version {parsed.version} (only 1 is defined)")
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


def load_headers(io: ImageIO) -> HeaderSet:
    """Read both headers and pick the current one; raise FormatError when there is none."""
    copies = tuple(
        parse_header_copy(io.read_exact_at(offset, c.HEADER_SIZE, f"Header {i + 1}"), i)
        for i, offset in enumerate(c.HEADER_OFFSETS)
    )
    index = choose_current(copies)
    if index is None:
        if any(copy.valid for copy in copies):
            seq = cast(Header, copies[0].header).sequence_number  # a tie of two valid copies
            raise FormatError(
                f"both headers have sequence number {seq} but differ; no current header",
                structure="Header 1",
                offset=c.HEADER_OFFSETS[0],
                path=io.path,
            )
        first = copies[0]
        raise FormatError(
            f"no valid header (Header 1: {first.problem}; Header 2: {copies[1].problem})",
            structure="Header 1",
            offset=first.offset,
            path=io.path,
        )
    headers = HeaderSet(copies, index)
    current = headers.current
    if current.log_version != c.LOG_VERSION and not current.log_is_empty:
        raise UnsupportedError(
            f"log version {current.log_version} (only 0 is defined)",
            structure=headers.current_copy.name,
            offset=headers.current_copy.offset,
            path=io.path,
        )
    return headers


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
