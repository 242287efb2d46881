"""Every on-disk structure of VHDX, declared once with construct, in the order of [MS-VHDX] §2.

Fields use the spec's names in snake_case; every integer is explicitly little-endian. Other modules import
this module (``from vhdx.format import layouts``) and refer to ``layouts.Header`` etc.

References: [MS-VHDX] §2.2 (header section), §2.3 (log), §2.5 (BAT), §2.6 (metadata).
"""

from __future__ import annotations

from construct import (
    BitsInteger,
    BitStruct,
    Bytes,
    ByteSwapped,
    Const,
    FixedSized,
    GreedyBytes,
    Int16ul,
    Int32ul,
    Int64ul,
    NullStripped,
    Padded,
    StringEncoded,
    Struct,
)
from construct.core import BytesIOWithOffsets, stream_read_entire, stream_tell

from vhdx.format import constants as c
from vhdx.format.guid import Guid
from vhdx.lazy import np


class _NulUnitsStripped(NullStripped):
    """NullStripped for an all-NUL pad: one ``rstrip`` instead of a Python loop per pad unit (same result)."""

    def _parse(self, stream, context, path):
        unit = len(self.pad)
        offset = stream_tell(stream, path)
        data = stream_read_entire(stream, path)
        end = len(data)
        tail = end % unit
        if not tail or not data[-tail:].strip(b"\x00"):
            end -= tail
            end -= (end - len(data[:end].rstrip(b"\x00"))) // unit * unit
        return self.subcon._parsereport(BytesIOWithOffsets(data[:end], stream, offset), context, path)


def _utf16_padded(length: int):
    """PaddedString(length, "utf-16-le") with the fast strip: a creator field is parsed once per file opened."""
    return StringEncoded(FixedSized(length, _NulUnitsStripped(GreedyBytes, pad=b"\x00\x00")), "utf-16-le")


# --- §2.2.1 File Type Identifier -------------------------------------------------------------------
FileIdentifier = Struct(
    "signature" / Const(c.FILE_SIGNATURE),
    # Diagnostic only (who made the file); never influences behaviour.
    "creator" / _utf16_padded(c.CREATOR_SIZE),
)

# --- §2.2.2 Headers --------------------------------------------------------------------------------
Header = Padded(
    c.HEADER_SIZE,
    Struct(
        "signature" / Const(c.HEADER_SIGNATURE),
        "checksum" / Int32ul,
        "sequence_number" / Int64ul,
        "file_write_guid" / Guid,
        "data_write_guid" / Guid,
        "log_guid" / Guid,
        "log_version" / Int16ul,
        "version" / Int16ul,
        "log_length" / Int32ul,
        "log_offset" / Int64ul,
    ),
)

# --- §2.2.3 Region table ---------------------------------------------------------------------------
RegionTableHeader = Struct(
    "signature" / Const(c.REGION_TABLE_SIGNATURE),
    "checksum" / Int32ul,
    "entry_count" / Int32ul,
    "reserved" / Int32ul,
)

RegionTableEntry = Struct(
    "guid" / Guid,
    "file_offset" / Int64ul,
    "length" / Int32ul,
    # Bit 0 is Required; the other bits are reserved.
    "flags" / Int32ul,
)

# --- §2.3.1 Log ------------------------------------------------------------------------------------
LogEntryHeader = Struct(
    "signature" / Const(c.LOG_ENTRY_SIGNATURE),
    "checksum" / Int32ul,
    "entry_length" / Int32ul,
    "tail" / Int32ul,
    "sequence_number" / Int64ul,
    "descriptor_count" / Int32ul,
    "reserved" / Int32ul,
    "log_guid" / Guid,
    "flushed_file_offset" / Int64ul,
    "last_file_offset" / Int64ul,
)

ZeroDescriptor = Struct(
    "signature" / Const(c.ZERO_DESCRIPTOR_SIGNATURE),
    "reserved" / Int32ul,
    "zero_length" / Int64ul,
    "file_offset" / Int64ul,
    "sequence_number" / Int64ul,
)

DataDescriptor = Struct(
    "signature" / Const(c.DATA_DESCRIPTOR_SIGNATURE),
    # Bytes 4092..4095 and 0..7 of the target sector, kept as raw bytes (the data sector has no room for them).
    "trailing_bytes" / Bytes(4),
    "leading_bytes" / Bytes(8),
    "file_offset" / Int64ul,
    "sequence_number" / Int64ul,
)

DataSector = Struct(
    "signature" / Const(c.DATA_SECTOR_SIGNATURE),
    "sequence_high" / Int32ul,
    "data" / Bytes(c.LOG_SECTOR_SIZE - 12),
    "sequence_low" / Int32ul,
)

# --- §2.5 BAT entry --------------------------------------------------------------------------------
# A little-endian u64: FileOffsetMB in bits 20..63, reserved bits 3..19, state in bits 0..2. The reader
# decodes whole BATs with numpy; this declaration is the reference the numpy code is tested against.
BatEntry = ByteSwapped(
    BitStruct(
        "file_offset_mb" / BitsInteger(44),
        "reserved" / BitsInteger(17),
        "state" / BitsInteger(3),
    )
)

# --- §2.6.1 Metadata table -------------------------------------------------------------------------
MetadataTableHeader = Struct(
    "signature" / Const(c.METADATA_SIGNATURE),
    "reserved" / Int16ul,
    "entry_count" / Int16ul,
    "reserved2" / Bytes(20),
)

MetadataTableEntry = Struct(
    "item_id" / Guid,
    "offset" / Int32ul,
    "length" / Int32ul,
    # IsUser (bit 0), IsVirtualDisk (bit 1), IsRequired (bit 2); the rest reserved.
    "flags" / Int32ul,
    "reserved2" / Int32ul,
)

# --- §2.6.2 Known metadata items -------------------------------------------------------------------
FileParameters = Struct(
    "block_size" / Int32ul,
    # LeaveBlockAllocated (bit 0), HasParent (bit 1).
    "flags" / Int32ul,
)

VirtualDiskSize = Struct("virtual_disk_size" / Int64ul)
VirtualDiskId = Struct("virtual_disk_id" / Guid)
LogicalSectorSize = Struct("logical_sector_size" / Int32ul)
PhysicalSectorSize = Struct("physical_sector_size" / Int32ul)

ParentLocatorHeader = Struct(
    "locator_type" / Guid,
    "reserved" / Int16ul,
    "key_value_count" / Int16ul,
)

ParentLocatorEntry = Struct(
    # Both offsets count from the start of the parent locator item; lengths are in bytes of UTF-16LE.
    "key_offset" / Int32ul,
    "value_offset" / Int32ul,
    "key_length" / Int16ul,
    "value_length" / Int16ul,
)

# The same log structures as numpy record types, for scanning a log a piece at a time (thousands of entries and
# descriptors: a construct parse each costs ~0.5 ms). Zero descriptors read ``low`` as Reserved and ``middle`` as
# ZeroLength; data descriptors read them as TrailingBytes and LeadingBytes. The dtypes are made on first use
# (``__getattr__`` below): opening a disk with an empty log never imports numpy.
_LOG_RECORD_FIELDS = {
    "LOG_ENTRY_HEADER_DTYPE": [
        ("signature", "S4"), ("checksum", "<u4"), ("entry_length", "<u4"), ("tail", "<u4"),
        ("sequence_number", "<u8"), ("descriptor_count", "<u4"), ("reserved", "<u4"), ("log_guid", "V16"),
        ("flushed_file_offset", "<u8"), ("last_file_offset", "<u8")],
    "LOG_DESCRIPTOR_DTYPE": [
        ("signature", "S4"), ("low", "<u4"), ("middle", "<u8"), ("file_offset", "<u8"), ("sequence_number", "<u8")],
}


def __getattr__(name: str):
    """``LOG_ENTRY_HEADER_DTYPE`` and ``LOG_DESCRIPTOR_DTYPE``, made once on first use (PEP 562)."""
    fields = _LOG_RECORD_FIELDS.get(name)
    if fields is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    made = globals()[name] = np.dtype(fields)
    return made


def _record_size(fields: list[tuple[str, str]]) -> int:
    """Bytes of a packed numpy record of ``fields`` (each format code ends in its byte count: S4, <u8, V16)."""
    return sum(int(code.lstrip("<SVu")) for _name, code in fields)


def _require_size(what, actual: int, expected: int) -> None:
    """A wrong declaration fails at import (``assert`` would vanish under ``python -O``)."""
    if actual != expected:
        raise ImportError(f"vhdx.format.layouts: {what} is {actual} bytes, the spec gives {expected}")


_require_size("LOG_ENTRY_HEADER_DTYPE", _record_size(_LOG_RECORD_FIELDS["LOG_ENTRY_HEADER_DTYPE"]),
              c.LOG_ENTRY_HEADER_SIZE)
_require_size("LOG_DESCRIPTOR_DTYPE", _record_size(_LOG_RECORD_FIELDS["LOG_DESCRIPTOR_DTYPE"]), c.LOG_DESCRIPTOR_SIZE)

# Sizes the rest of the code relies on; a wrong declaration fails at import, not on a customer's disk.
_FIXED_SIZES = {
    FileIdentifier: 8 + c.CREATOR_SIZE,
    Header: c.HEADER_SIZE,
    RegionTableHeader: c.REGION_TABLE_HEADER_SIZE,
    RegionTableEntry: c.REGION_ENTRY_SIZE,
    LogEntryHeader: c.LOG_ENTRY_HEADER_SIZE,
    ZeroDescriptor: c.LOG_DESCRIPTOR_SIZE,
    DataDescriptor: c.LOG_DESCRIPTOR_SIZE,
    DataSector: c.LOG_SECTOR_SIZE,
    BatEntry: c.BAT_ENTRY_SIZE,
    MetadataTableHeader: c.METADATA_TABLE_HEADER_SIZE,
    MetadataTableEntry: c.METADATA_ENTRY_SIZE,
    FileParameters: 8,
    VirtualDiskSize: 8,
    VirtualDiskId: 16,
    LogicalSectorSize: 4,
    PhysicalSectorSize: 4,
    ParentLocatorHeader: c.LOCATOR_HEADER_SIZE,
    ParentLocatorEntry: c.LOCATOR_ENTRY_SIZE,
}
for _layout, _size in _FIXED_SIZES.items():
    _require_size(_layout, _layout.sizeof(), _size)
del _layout, _size

# Names used in error messages (construct objects have no name of their own).
LAYOUT_NAMES = {
    id(FileIdentifier): "File Type Identifier",
    id(Header): "Header",
    id(RegionTableHeader): "Region Table Header",
    id(RegionTableEntry): "Region Table Entry",
    id(LogEntryHeader): "Log Entry Header",
    id(ZeroDescriptor): "Zero Descriptor",
    id(DataDescriptor): "Data Descriptor",
    id(DataSector): "Data Sector",
    id(BatEntry): "BAT Entry",
    id(MetadataTableHeader): "Metadata Table Header",
    id(MetadataTableEntry): "Metadata Table Entry",
    id(FileParameters): "File Parameters",
    id(VirtualDiskSize): "Virtual Disk Size",
    id(VirtualDiskId): "Virtual Disk ID",
    id(LogicalSectorSize): "Logical Sector Size",
    id(PhysicalSectorSize): "Physical Sector Size",
    id(ParentLocatorHeader): "Parent Locator Header",
    id(ParentLocatorEntry): "Parent Locator Entry",
}


def layout_name(layout) -> str:
    """Human name of a layout for error messages."""
    return LAYOUT_NAMES.get(id(layout), "structure")
