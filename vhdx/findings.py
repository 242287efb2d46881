"""What ``check`` reports: a Finding per inconsistency, with a stable code, severity, structure and offset.

The codes are the contract between ``check``, the fixture faults that must provoke them, and ``repair``.

References: [MS-VHDX] §2.2-§2.6 (each code names the rule it checks in its description).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum


class Severity(str, Enum):
    ERROR = "error"  # corruption: data may be read wrong or the file cannot be used
    WARNING = "warning"  # legal but suspicious, or tolerated deviations (e.g. identical headers with equal seq)
    LEAK = "leak"  # space no structure references; harmless, reclaimable
    INFO = "info"


@dataclass(frozen=True)
class Finding:
    """One inconsistency ``check`` reports: severity, code, structure, file offset and message."""

    severity: Severity
    code: str
    structure: str
    offset: int | None
    message: str
    path: str | None = None
    repairable: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d["severity"] = self.severity.value
        d["code"] = str(self.code)
        return d


class Code(str, Enum):
    """Every finding code, with what it means (``Code.X.description``); compares and serialises as its name.

    Python 3.10 has no ``StrEnum``: a ``str`` mixin with ``__str__`` returning the value behaves the same.
    """

    description: str

    def __new__(cls, value: str, description: str) -> Code:
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        return member

    def __str__(self) -> str:
        return self.value

    NOT_VHDX = "NOT_VHDX", "file does not start with the 'vhdxfile' signature"
    FILE_TRUNCATED = "FILE_TRUNCATED", "file ends before a structure it must hold"
    HEADER_SIGNATURE = "HEADER_SIGNATURE", "a header copy lacks the 'head' signature"
    HEADER_CHECKSUM = "HEADER_CHECKSUM", "a header copy's CRC-32C does not match"
    HEADER_VERSION = "HEADER_VERSION", "a header copy has Version != 1 or LogVersion != 0"
    HEADER_NO_CURRENT = (
        "HEADER_NO_CURRENT",
        "no header copy is valid, or both are valid with equal sequence numbers but differ",
    )
    HEADER_STALE = "HEADER_STALE", "the non-current header copy is older than the current one"
    HEADER_SEQUENCE_TIE = (
        "HEADER_SEQUENCE_TIE",
        "both headers are identical with equal sequence numbers (Disk2VHD style)",
    )
    HEADER_LOG_PLACEMENT = (
        "HEADER_LOG_PLACEMENT",
        "the header's log offset/length is misaligned or inside the header section",
    )
    REGION_TABLE_SIGNATURE = "REGION_TABLE_SIGNATURE", "a region table copy lacks the 'regi' signature"
    REGION_TABLE_CHECKSUM = "REGION_TABLE_CHECKSUM", "a region table copy's CRC-32C does not match"
    REGION_TABLE_MISMATCH = "REGION_TABLE_MISMATCH", "the two region table copies differ"
    REGION_TABLE_ENTRY_COUNT = "REGION_TABLE_ENTRY_COUNT", "a region table claims more than 2047 entries"
    REGION_MISSING = "REGION_MISSING", "the BAT or metadata region is missing"
    REGION_DUPLICATE = "REGION_DUPLICATE", "a region GUID appears more than once"
    REGION_ALIGNMENT = "REGION_ALIGNMENT", "a region is not 1 MiB aligned or lies in the header section"
    REGION_OVERLAP = "REGION_OVERLAP", "regions overlap each other or the log"
    REGION_BEYOND_EOF = "REGION_BEYOND_EOF", "a region extends past the end of the file"
    REGION_UNKNOWN_REQUIRED = "REGION_UNKNOWN_REQUIRED", "an unknown region is marked required"
    METADATA_SIGNATURE = "METADATA_SIGNATURE", "the metadata table lacks the 'metadata' signature"
    METADATA_ENTRY_COUNT = "METADATA_ENTRY_COUNT", "the metadata table claims more than 2047 entries"
    METADATA_ITEM_MISSING = "METADATA_ITEM_MISSING", "a required system metadata item is missing"
    METADATA_ITEM_DUPLICATE = "METADATA_ITEM_DUPLICATE", "a metadata item appears more than once"
    METADATA_ITEM_BOUNDS = "METADATA_ITEM_BOUNDS", "a metadata item lies outside the item area of the region"
    METADATA_ITEM_OVERLAP = "METADATA_ITEM_OVERLAP", "two metadata items overlap"
    METADATA_ITEM_LENGTH = "METADATA_ITEM_LENGTH", "a system item has the wrong length"
    METADATA_VALUE = "METADATA_VALUE", "a system item holds an illegal value (block size, sector size, virtual size)"
    METADATA_UNKNOWN_REQUIRED = "METADATA_UNKNOWN_REQUIRED", "an unknown metadata item is marked required"
    METADATA_FLAGS = (
        "METADATA_FLAGS",
        "a system item's IsUser/IsVirtualDisk/IsRequired flags differ from the spec's table",
    )
    LOCATOR_MISSING = "LOCATOR_MISSING", "a differencing disk has no parent locator"
    LOCATOR_TYPE = "LOCATOR_TYPE", "the parent locator type is not the VHDX one"
    LOCATOR_MALFORMED = "LOCATOR_MALFORMED", "the parent locator's entries or strings are out of bounds or invalid"
    LOCATOR_KEYS = "LOCATOR_KEYS", "parent_linkage or every parent path is missing"
    PARENT_NOT_FOUND = "PARENT_NOT_FOUND", "no locator path leads to the parent"
    PARENT_MISMATCH = "PARENT_MISMATCH", "the parent's DataWriteGuid matches neither linkage value"
    CHAIN_LOOP = "CHAIN_LOOP", "the chain refers back to one of its own files"
    CHAIN_SECTOR_SIZE = "CHAIN_SECTOR_SIZE", "parent and child logical sector sizes differ"
    CHAIN_VIRTUAL_SIZE = "CHAIN_VIRTUAL_SIZE", "the parent is larger than the child"
    BAT_REGION_SIZE = "BAT_REGION_SIZE", "the BAT region cannot hold every entry the geometry needs"
    BAT_STATE_ILLEGAL = "BAT_STATE_ILLEGAL", "a BAT entry has a state not legal for its kind or the disk type"
    BAT_RESERVED_BITS = "BAT_RESERVED_BITS", "a BAT entry has reserved bits set"
    BAT_BEYOND_EOF = "BAT_BEYOND_EOF", "a present block lies past the end of the file"
    BAT_OVERLAP = "BAT_OVERLAP", "two blocks share file space"
    BAT_OVERLAPS_STRUCTURE = (
        "BAT_OVERLAPS_STRUCTURE",
        "a block overlaps the header section, log, BAT or metadata region",
    )
    BAT_BITMAP_MISSING = "BAT_BITMAP_MISSING", "a partially present block's chunk has no sector bitmap block"
    BAT_SB_IN_NON_DIFFERENCING = (
        "BAT_SB_IN_NON_DIFFERENCING",
        "a fixed/dynamic disk has a sector bitmap entry that is not NOT_PRESENT",
    )
    LOG_DIRTY = "LOG_DIRTY", "the log holds entries that must be replayed"
    LOG_NO_VALID_SEQUENCE = "LOG_NO_VALID_SEQUENCE", "the header names a log GUID but no valid log sequence exists"
    LOG_TRUNCATED = "LOG_TRUNCATED", "the file is shorter than the log's FlushedFileOffset"
    LOG_INVALID = "LOG_INVALID", "a log entry writes where no log may (header section, the log itself, past a sane end)"
    LOG_TORN_ENTRY = "LOG_TORN_ENTRY", "an entry with the current log GUID is incomplete or fails its checksum"
    LEAKED_SPACE = "LEAKED_SPACE", "file space that no structure references"
    CHAIN_TOO_DEEP = "CHAIN_TOO_DEEP", "the chain holds more files than vhdx.disk.chain.MAX_CHAIN_DEPTH"
    MERGE_INTERRUPTED = "MERGE_INTERRUPTED", "a merge into this disk was started and not finished"
    LAYOUT_INTERRUPTED = (
        "LAYOUT_INTERRUPTED",
        "a resize or compaction of this disk was started and not finished (--resume)",
    )
    IN_USE = "IN_USE", "another process has the file open for writing: findings may be transient"
    LOG_IN_USE = "LOG_IN_USE", "the log of a writer at work (checked as replayed in memory; not corruption)"


# Code -> what it means, as plain strings (the contract between check, the fixture faults and repair).
CODES: dict[str, str] = {code.value: code.description for code in Code}


@dataclass(frozen=True)
class Problem:
    """One broken rule of one structure, as the structure modules report it (``*_problems`` functions).

    ``check`` turns each into a Finding; a loader raises ``VhdxError.from_problem`` for the first one whose
    ``refuses_open`` is set (a rule the reader depends on).

    Attributes:
        code: which rule (a ``Code``).
        structure: the structure concerned (e.g. ``"Header 2"``, ``"BAT entry 17 (payload block 17)"``).
        offset: its file offset, or None.
        message: what is wrong, one line.
        severity: how check reports it.
        repairable: ``repair`` can fix it.
        refuses_open: the reader cannot use the file while this holds.
    """

    code: Code
    structure: str
    offset: int | None
    message: str
    severity: Severity = Severity.ERROR
    repairable: bool = False
    refuses_open: bool = True
