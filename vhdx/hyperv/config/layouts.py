"""The "Hyper-V storage" container of ``.vmcx``/``.vmrs``/``data.vmcx``, declared once with construct.

These layouts live here, not in ``vhdx/format/layouts.py``: they describe a different file format (Hyper-V's
configuration store, undocumented by Microsoft), not VHDX. Field names follow the reverse-engineered
descriptions of VmDataStore.dll; every integer is little-endian and every structure is packed (no padding).
Every checksum is the plain CRC-32 (zlib) of the structure with its checksum field zeroed.

Map of a file (offsets from the samples; the header names the log, the object table is always at 0x2000)::

    0x0000  header 1 (46 bytes used of a 4 KiB slot)
    0x1000  header 2
    0x2000  object table: signature, count, then 18-byte entries (type, crc, offset, size, allocated)
    ...     key tables (4 KiB each, one per index, highest sequence wins), file objects, free space
    log     replay log header (34 bytes), 28-byte entries; each entry's data sits at log offset + data_offset
"""

from __future__ import annotations

import enum

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, Struct

STORAGE_SIGNATURE = 0x01282014
REPLAY_LOG_SIGNATURE = 0x01110003
OBJECT_TABLE_SIGNATURE = 0x01110001
KEY_TABLE_SIGNATURE = 0x0002
SUPPORTED_VERSION = 0x400  # the only version seen in the wild (Windows 10 / Server 2016 and later)

HEADER_OFFSETS = (0x0000, 0x1000)
HEADER_SLOT_SIZE = 0x1000
OBJECT_TABLE_OFFSET = 0x2000
KEY_TABLE_SIZE = 0x1000  # what Hyper-V allocates per key table (the object table records the size)
FILE_OBJECT_FLAG = 0x01  # high byte of a key entry's type: the value lives in a file object
# Seen on GUID-like strings in .vmrs samples; it does not change how the value is stored (meaning unknown).
STRING_HINT_FLAG = 0x02
KNOWN_FLAGS = FILE_OBJECT_FLAG | STRING_HINT_FLAG
INLINE_VALUE_LIMIT = 0x800  # larger strings and arrays go to file objects


class ObjectType(enum.IntEnum):
    """Kinds of object-table entries."""

    UNUSED = 0
    OBJECT_TABLE = 1
    KEY_TABLE = 2
    FILE = 3
    FREE = 4
    HEADER = 5
    REPLAY_LOG = 6
    CHANGE_TRACKING_BUFFER = 7


class ValueType(enum.IntEnum):
    """Kinds of key-table entries (the low byte of the entry type)."""

    FREE = 1
    UNKNOWN = 2
    INT = 3
    UINT = 4
    DOUBLE = 5
    STRING = 6
    ARRAY = 7
    BOOL = 8
    NODE = 9


# --- file header (two copies) ----------------------------------------------------------------------
StorageHeader = Struct(
    "signature" / Const(STORAGE_SIGNATURE, Int32ul),
    "checksum" / Int32ul,
    "sequence_number" / Int16ul,
    "version" / Int32ul,
    "reserved" / Int64ul,
    "alignment" / Int32ul,
    "replay_log_offset" / Int64ul,
    "replay_log_size" / Int64ul,
    "header_size" / Int32ul,
)
HEADER_CHECKSUM_OFFSET = 4

# --- replay log --------------------------------------------------------------------------------------
ReplayLogHeader = Struct(
    "signature" / Const(REPLAY_LOG_SIGNATURE, Int32ul),
    "checksum" / Int32ul,
    "num_entries" / Int32ul,  # entries still to replay; older ones stay in the log after them
    "reserved1" / Int8ul,
    "max_entries" / Int32ul,
    "reserved2" / Bytes(17),
)
REPLAY_LOG_CHECKSUM_OFFSET = 4

ReplayLogEntry = Struct(
    "offset" / Int64ul,  # where the data goes in the file
    "size" / Int32ul,
    "data_offset" / Int32ul,  # where the data is, from the start of the log
    "reserved" / Int32ul,
    "checksum" / Int32ul,
    "data_checksum" / Int32ul,
)
REPLAY_ENTRY_CHECKSUM_OFFSET = 20

# --- object table --------------------------------------------------------------------------------------
ObjectTableHeader = Struct(
    "signature" / Const(OBJECT_TABLE_SIGNATURE, Int32ul),
    "num_entries" / Int32ul,
)

ObjectTableEntry = Struct(
    "type" / Int8ul,
    "checksum" / Int32ul,
    "offset" / Int64ul,
    "size" / Int32ul,
    "allocated" / Int8ul,
)
OBJECT_ENTRY_CHECKSUM_OFFSET = 1

# --- key tables ---------------------------------------------------------------------------------------
KeyTableHeader = Struct(
    "signature" / Const(KEY_TABLE_SIGNATURE, Int16ul),
    "index" / Int16ul,
    "sequence_number" / Int16ul,
    "checksum" / Int32ul,
)
KEY_TABLE_CHECKSUM_OFFSET = 6

KeyEntryHeader = Struct(
    "type" / Int16ul,  # low byte ValueType, high byte flags (FILE_OBJECT_FLAG)
    "size" / Int32ul,  # whole entry, header included
    "parent_table_index" / Int16ul,  # 0: a root key
    "parent_offset" / Int32ul,  # of the parent entry within its table
    "checksum" / Int32ul,
    "insertion_sequence" / Int32ul,
    "data_offset" / Int8ul,  # the key name (NUL-terminated UTF-8) fills the bytes before the value
)
KEY_ENTRY_CHECKSUM_OFFSET = 12

FileObjectPointer = Struct(
    "size" / Int32ul,
    "offset" / Int64ul,
)

# Packed sizes, checked once at import (the checksums cover exactly these spans).
for _layout, _size in ((StorageHeader, 0x2E), (ReplayLogHeader, 0x22), (ReplayLogEntry, 0x1C),
                       (ObjectTableHeader, 8), (ObjectTableEntry, 0x12), (KeyTableHeader, 0xA),
                       (KeyEntryHeader, 21), (FileObjectPointer, 12)):
    assert _layout.sizeof() == _size, (_layout, _size)
