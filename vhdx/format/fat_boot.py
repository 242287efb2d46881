"""The FAT boot sector's BIOS parameter block (the guest's content, not a VHDX structure).

compact --mode quick reads FAT tables through The Sleuth Kit, which does not expose the cluster geometry; these
few fields give it, and quick checks them against what The Sleuth Kit reports before trusting either.

References: Microsoft FAT specification (FAT: General Overview of On-Disk Format), §3.1-3.3.
"""

from __future__ import annotations

from construct import Bytes, Int8ul, Int16ul, Int32ul, Struct

BOOT_SIGNATURE = 0xAA55
BOOT_SECTOR_SIZE = 512
DIR_ENTRY_SIZE = 32  # bytes of one root directory entry (FAT12/16 fixed root directory)

BiosParameterBlock = Struct(
    "jump" / Bytes(3),
    "oem_name" / Bytes(8),
    "bytes_per_sector" / Int16ul,
    "sectors_per_cluster" / Int8ul,
    "reserved_sectors" / Int16ul,
    "fat_count" / Int8ul,
    "root_entries" / Int16ul,
    "total_sectors_16" / Int16ul,
    "media" / Int8ul,
    "fat_sectors_16" / Int16ul,
    "sectors_per_track" / Int16ul,
    "heads" / Int16ul,
    "hidden_sectors" / Int32ul,
    "total_sectors_32" / Int32ul,
    "fat_sectors_32" / Int32ul,  # FAT32 only (the extended BPB); FAT12/16 have fat_sectors_16 != 0
    "rest" / Bytes(BOOT_SECTOR_SIZE - 40 - 2),
    "signature" / Int16ul,
)
