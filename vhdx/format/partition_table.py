"""MBR and GPT partition table layouts (the virtual disk's own content, not VHDX structures).

A small construct declaration instead of a library: the well-kept partition readers are GPL/AGPL
(dissect.volume, pyparted) and cannot be runtime dependencies of an MIT package.

References: UEFI Specification 2.10 §5.2 (legacy MBR, protective MBR) and §5.3 (GPT header, entries).
"""

from __future__ import annotations

import uuid

from construct import Array, Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, PaddedString, Struct

from vhdx.format.guid import Guid

MBR_SIGNATURE = 0xAA55
MBR_ENTRIES_OFFSET = 446
GPT_SIGNATURE = b"EFI PART"
GPT_PROTECTIVE_TYPE = 0xEE
MBR_EXTENDED_TYPES = (0x05, 0x0F, 0x85)  # CHS, LBA and Linux extended partitions: a chain of EBRs
UNUSED_GPT_TYPE = uuid.UUID(int=0)

# --- legacy MBR and EBR (sector 0 / each extended boot record) -------------------------------------
MbrEntry = Struct(
    "status" / Int8ul,
    "chs_first" / Bytes(3),
    "type" / Int8ul,
    "chs_last" / Bytes(3),
    "lba_first" / Int32ul,
    "sectors" / Int32ul,
)
Mbr = Struct(
    "boot_code" / Bytes(MBR_ENTRIES_OFFSET),
    "entries" / Array(4, MbrEntry),
    "signature" / Int16ul,
)

# --- GPT header (LBA 1) and partition entries ------------------------------------------------------
GptHeader = Struct(
    "signature" / Const(GPT_SIGNATURE),
    "revision" / Int32ul,
    "header_size" / Int32ul,
    "header_crc32" / Int32ul,
    "reserved" / Int32ul,
    "current_lba" / Int64ul,
    "backup_lba" / Int64ul,
    "first_usable_lba" / Int64ul,
    "last_usable_lba" / Int64ul,
    "disk_guid" / Guid,
    "entries_lba" / Int64ul,
    "entry_count" / Int32ul,
    "entry_size" / Int32ul,
    "entries_crc32" / Int32ul,
)
GptEntry = Struct(
    "type_guid" / Guid,
    "unique_guid" / Guid,
    "first_lba" / Int64ul,
    "last_lba" / Int64ul,
    "attributes" / Int64ul,
    "name" / PaddedString(72, "utf-16-le"),
)

# A wrong declaration fails at import (an ``assert`` would vanish under ``python -O``).
for _name, _layout, _size in (("MBR", Mbr, 512), ("GPT header", GptHeader, 92), ("GPT entry", GptEntry, 128)):
    if _layout.sizeof() != _size:
        raise ImportError(f"vhdx.format.partition_table: {_name} is {_layout.sizeof()} bytes, not {_size}")
del _name, _layout, _size
