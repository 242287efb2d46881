"""Every fixed number of the VHDX format: sizes, offsets, signatures, GUIDs and state values.

Map of the header section (the first 1 MiB), all offsets derived from ``HEADER_BLOCK_SIZE``::

    0x000000  +--------------------------+  File Type Identifier ("vhdxfile" + creator), 64 KiB
    0x010000  +--------------------------+  Header 1 (4 KiB structure in a 64 KiB slot)
    0x020000  +--------------------------+  Header 2
    0x030000  +--------------------------+  Region Table 1 (64 KiB)
    0x040000  +--------------------------+  Region Table 2 (identical copy)
    0x050000  +--------------------------+  reserved
    0x100000  +--------------------------+  log, BAT, metadata and blocks, each 1 MiB aligned

References: [MS-VHDX] §2.2-§2.6.
"""

from __future__ import annotations

import uuid
from enum import IntEnum

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

# --- §2.2 header section -------------------------------------------------------------------------
HEADER_BLOCK_SIZE = 64 * KiB
FILE_IDENTIFIER_OFFSET = 0
HEADER_OFFSETS = (1 * HEADER_BLOCK_SIZE, 2 * HEADER_BLOCK_SIZE)
REGION_TABLE_OFFSETS = (3 * HEADER_BLOCK_SIZE, 4 * HEADER_BLOCK_SIZE)
HEADER_SECTION_SIZE = 1 * MiB
HEADER_SIZE = 4 * KiB
REGION_TABLE_SIZE = 64 * KiB
CREATOR_SIZE = 512

# Every object after the header section sits on this alignment.
ALIGNMENT = 1 * MiB
# Space a writer may leave between its last structure and its first block (QEMU leaves 4 MiB after the
# metadata region): free space, never a leak.
WRITER_LAYOUT_GAP = 4 * MiB

FILE_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
REGION_TABLE_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"
LOG_ENTRY_SIGNATURE = b"loge"
ZERO_DESCRIPTOR_SIGNATURE = b"zero"
DATA_DESCRIPTOR_SIGNATURE = b"desc"
DATA_SECTOR_SIGNATURE = b"data"

HEADER_VERSION = 1
LOG_VERSION = 0

# Byte offset of the CRC-32C field inside each checksummed structure.
HEADER_CHECKSUM_OFFSET = 4
REGION_TABLE_CHECKSUM_OFFSET = 4
LOG_ENTRY_CHECKSUM_OFFSET = 4

# --- §2.2.3 region table ---------------------------------------------------------------------------
REGION_TABLE_MAX_ENTRIES = 2047
REGION_ENTRY_SIZE = 32
REGION_TABLE_HEADER_SIZE = 16
REGION_REQUIRED_FLAG = 0x1  # Required bit of a region table entry's flags

BAT_REGION_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
KNOWN_REGIONS = {BAT_REGION_GUID: "BAT", METADATA_REGION_GUID: "Metadata"}

# --- §2.3 log --------------------------------------------------------------------------------------
LOG_SECTOR_SIZE = 4 * KiB
LOG_ENTRY_HEADER_SIZE = 64
LOG_DESCRIPTOR_SIZE = 32
# The first descriptor sector also holds the 64-byte entry header, so it fits two fewer descriptors.
DESCRIPTORS_PER_SECTOR = LOG_SECTOR_SIZE // LOG_DESCRIPTOR_SIZE
DEFAULT_LOG_SIZE = 1 * MiB

# --- §2.6 metadata ---------------------------------------------------------------------------------
METADATA_TABLE_SIZE = 64 * KiB
METADATA_TABLE_MAX_ENTRIES = 2047
METADATA_MAX_USER_ENTRIES = 1024
METADATA_ITEM_MAX_LENGTH = 1 * MiB
METADATA_TABLE_HEADER_SIZE = 32
METADATA_ENTRY_COUNT_OFFSET = 10  # of the 16-bit EntryCount inside the table header
# §2.6.2.6 parent locator: a 20-byte header, then 12-byte key/value entries, then the UTF-16LE strings.
LOCATOR_HEADER_SIZE = 20
LOCATOR_ENTRY_SIZE = 12
METADATA_ENTRY_SIZE = 32
DEFAULT_METADATA_REGION_SIZE = 1 * MiB

FILE_PARAMETERS_GUID = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID_GUID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE_GUID = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_GUID = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")

# The one parent locator type defined for VHDX parents (§2.6.2.6).
VHDX_PARENT_LOCATOR_TYPE_GUID = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")

PARENT_LINKAGE_KEY = "parent_linkage"
PARENT_LINKAGE2_KEY = "parent_linkage2"
RELATIVE_PATH_KEY = "relative_path"
VOLUME_PATH_KEY = "volume_path"
ABSOLUTE_WIN32_PATH_KEY = "absolute_win32_path"
# The order in which §2.6.2.6.3 says to try the locator paths.
PARENT_PATH_KEYS = (RELATIVE_PATH_KEY, VOLUME_PATH_KEY, ABSOLUTE_WIN32_PATH_KEY)

# Metadata entry flags (§2.6.1.2).
META_IS_USER = 0x1
META_IS_VIRTUAL_DISK = 0x2
META_IS_REQUIRED = 0x4

# File parameter flags (§2.6.2.1).
FILE_PARAM_LEAVE_BLOCK_ALLOCATED = 0x1
FILE_PARAM_HAS_PARENT = 0x2

# --- §2.5 BAT and geometry -------------------------------------------------------------------------
BAT_ENTRY_SIZE = 8
BAT_STATE_MASK = 0x7
BAT_RESERVED_MASK = 0xFFFF8  # bits 3..19
BAT_OFFSET_SHIFT = 20  # FileOffsetMB occupies bits 20..63
SECTOR_BITMAP_BLOCK_SIZE = 1 * MiB
# One sector bitmap block covers 2**23 sectors (one bit each): a "chunk".
SECTORS_PER_CHUNK = 8 * SECTOR_BITMAP_BLOCK_SIZE

MIN_BLOCK_SIZE = 1 * MiB
MAX_BLOCK_SIZE = 256 * MiB
DEFAULT_BLOCK_SIZE = 32 * MiB
SECTOR_SIZES = (512, 4096)
MAX_VIRTUAL_SIZE = 64 * TiB


class BatState(IntEnum):
    """Payload block states (§2.5.1.1)."""

    NOT_PRESENT = 0
    UNDEFINED = 1
    ZERO = 2
    UNMAPPED = 3
    # Draft spec v0.95 used 5 for UNMAPPED: read it like 3, never write it.
    UNMAPPED_V095 = 5
    FULLY_PRESENT = 6
    PARTIALLY_PRESENT = 7


# Payload states that read as zeros in every disk type, without consulting a parent; an entry in one of them may
# keep the file offset it had while present (the writer reuses that space). 5 is the v0.95 UNMAPPED.
ZERO_READING_STATES = (BatState.UNDEFINED, BatState.ZERO, BatState.UNMAPPED, BatState.UNMAPPED_V095)


class SbState(IntEnum):
    """Sector bitmap block states (§2.5.1.2)."""

    NOT_PRESENT = 0
    PRESENT = 6


class DiskType(IntEnum):
    """How a file provisions its blocks; the format has no type field, it follows from File Parameters."""

    FIXED = 2
    DYNAMIC = 3
    DIFFERENCING = 4

    @property
    def label(self) -> str:
        return self.name.lower()


ZERO_GUID = uuid.UUID(int=0)
