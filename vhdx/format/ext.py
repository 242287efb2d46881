"""ext2/3/4 on-disk layouts a guest's free space is read from: the superblock and the block group descriptor.

Only what compact --mode quick needs is declared by name (geometry, state, features, checksum seeds); the rest of
each structure is padding of its exact size, so the offsets stay those of the on-disk format. These are the guest's
structures, not VHDX ones: all fields are little-endian.

References: Linux kernel documentation, Documentation/filesystems/ext4/ (super.rst, group_descr.rst,
bitmaps.rst, checksums.rst).
"""

from __future__ import annotations

import numpy as np
from construct import Bytes, Int8ul, Int16ul, Int32ul, Padding, Struct

SUPERBLOCK_OFFSET = 1024  # bytes into the volume, whatever the block size
SUPERBLOCK_SIZE = 1024
MAGIC = 0xEF53
DESC_SIZE_32 = 32  # a group descriptor without INCOMPAT_64BIT
DESC_SIZE_64_MIN = 64  # the smallest descriptor with the _hi halves (and the high 16 bits of the bitmap checksum)
SUPERBLOCK_CSUM_OFFSET = 0x3FC
DESC_CSUM_OFFSET = 0x1E

# s_state
STATE_VALID = 0x1  # cleanly unmounted
STATE_ERROR = 0x2  # errors detected

# s_feature_compat
COMPAT_DIR_PREALLOC = 0x1
COMPAT_IMAGIC_INODES = 0x2
COMPAT_HAS_JOURNAL = 0x4
COMPAT_EXT_ATTR = 0x8
COMPAT_RESIZE_INODE = 0x10
COMPAT_DIR_INDEX = 0x20
COMPAT_LAZY_BG = 0x40
COMPAT_EXCLUDE_INODE = 0x80
COMPAT_EXCLUDE_BITMAP = 0x100
COMPAT_SPARSE_SUPER2 = 0x200
COMPAT_FAST_COMMIT = 0x400
COMPAT_STABLE_INODES = 0x800
COMPAT_ORPHAN_FILE = 0x1000

# s_feature_incompat
INCOMPAT_COMPRESSION = 0x1
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4  # the journal needs recovery
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_EA_INODE = 0x400
INCOMPAT_DIRDATA = 0x1000
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_ENCRYPT = 0x10000
INCOMPAT_CASEFOLD = 0x20000

# s_feature_ro_compat
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_LARGE_FILE = 0x2
RO_COMPAT_BTREE_DIR = 0x4
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_DIR_NLINK = 0x20
RO_COMPAT_EXTRA_ISIZE = 0x40
RO_COMPAT_HAS_SNAPSHOT = 0x80
RO_COMPAT_QUOTA = 0x100
RO_COMPAT_BIGALLOC = 0x200
RO_COMPAT_METADATA_CSUM = 0x400
RO_COMPAT_REPLICA = 0x800
RO_COMPAT_READONLY = 0x1000
RO_COMPAT_PROJECT = 0x2000
RO_COMPAT_SHARED_BLOCKS = 0x4000
RO_COMPAT_VERITY = 0x8000
RO_COMPAT_ORPHAN_PRESENT = 0x10000

# Features whose meaning for block allocation is known: with only these, the block bitmaps say which blocks are
# free. Compression, a journal device, Lustre's dirdata, snapshots, bigalloc clusters and shared (deduplicated)
# blocks change what a bitmap bit means or are not a plain volume; unknown bits may too.
INCOMPAT_UNDERSTOOD = (INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG | INCOMPAT_EXTENTS | INCOMPAT_64BIT
                       | INCOMPAT_MMP | INCOMPAT_FLEX_BG | INCOMPAT_EA_INODE | INCOMPAT_CSUM_SEED | INCOMPAT_LARGEDIR
                       | INCOMPAT_INLINE_DATA | INCOMPAT_ENCRYPT | INCOMPAT_CASEFOLD)
RO_COMPAT_UNDERSTOOD = (RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_BTREE_DIR | RO_COMPAT_HUGE_FILE
                        | RO_COMPAT_GDT_CSUM | RO_COMPAT_DIR_NLINK | RO_COMPAT_EXTRA_ISIZE | RO_COMPAT_QUOTA
                        | RO_COMPAT_METADATA_CSUM | RO_COMPAT_READONLY | RO_COMPAT_PROJECT | RO_COMPAT_VERITY
                        | RO_COMPAT_ORPHAN_PRESENT)

# bg_flags
BG_INODE_UNINIT = 0x1
BG_BLOCK_UNINIT = 0x2  # the block bitmap was never written: only the group's own metadata is in use
BG_INODE_ZEROED = 0x4

Superblock = Struct(
    "inodes_count" / Int32ul,  # 0x00
    "blocks_count_lo" / Int32ul,
    "r_blocks_count_lo" / Int32ul,
    "free_blocks_count_lo" / Int32ul,
    "free_inodes_count" / Int32ul,  # 0x10
    "first_data_block" / Int32ul,
    "log_block_size" / Int32ul,
    "log_cluster_size" / Int32ul,
    "blocks_per_group" / Int32ul,  # 0x20
    "clusters_per_group" / Int32ul,
    "inodes_per_group" / Int32ul,
    "mtime" / Int32ul,
    "wtime" / Int32ul,  # 0x30
    "mnt_count" / Int16ul,
    "max_mnt_count" / Int16ul,
    "magic" / Int16ul,  # 0x38
    "state" / Int16ul,
    "errors" / Int16ul,
    "minor_rev_level" / Int16ul,
    Padding(0x4C - 0x40),  # last check, check interval, creator OS
    "rev_level" / Int32ul,  # 0x4C
    Padding(0x58 - 0x50),  # reserved uid/gid, first inode
    "inode_size" / Int16ul,  # 0x58
    "block_group_nr" / Int16ul,
    "feature_compat" / Int32ul,  # 0x5C
    "feature_incompat" / Int32ul,
    "feature_ro_compat" / Int32ul,
    "uuid" / Bytes(16),  # 0x68
    Padding(0xCE - 0x78),  # volume name, last mount point, bitmap algorithm, preallocation
    "reserved_gdt_blocks" / Int16ul,  # 0xCE
    Padding(0xFE - 0xD0),  # journal UUID, inode, device, orphan list, hash seed and version, backup type
    "desc_size" / Int16ul,  # 0xFE
    Padding(0x104 - 0x100),  # default mount options
    "first_meta_bg" / Int32ul,  # 0x104
    Padding(0x150 - 0x108),  # mkfs time, journal block backup
    "blocks_count_hi" / Int32ul,  # 0x150
    Padding(0x174 - 0x154),
    "log_groups_per_flex" / Int8ul,  # 0x174
    "checksum_type" / Int8ul,
    Padding(0x24C - 0x176),
    "backup_bgs" / Int32ul[2],  # 0x24C: the two groups with backups under sparse_super2
    Padding(0x270 - 0x254),
    "checksum_seed" / Int32ul,  # 0x270: with INCOMPAT_CSUM_SEED
    Padding(SUPERBLOCK_CSUM_OFFSET - 0x274),
    "checksum" / Int32ul,  # 0x3FC
)

GroupDescriptor = Struct(
    "block_bitmap_lo" / Int32ul,  # 0x00
    "inode_bitmap_lo" / Int32ul,
    "inode_table_lo" / Int32ul,
    "free_blocks_count_lo" / Int16ul,  # 0x0C
    "free_inodes_count_lo" / Int16ul,
    "used_dirs_count_lo" / Int16ul,
    "flags" / Int16ul,  # 0x12
    "exclude_bitmap_lo" / Int32ul,
    "block_bitmap_csum_lo" / Int16ul,  # 0x18
    "inode_bitmap_csum_lo" / Int16ul,
    "itable_unused_lo" / Int16ul,
    "checksum" / Int16ul,  # 0x1E
)

GroupDescriptorHigh = Struct(  # bytes 0x20-0x3F of a 64-byte descriptor (INCOMPAT_64BIT)
    "block_bitmap_hi" / Int32ul,  # 0x20
    "inode_bitmap_hi" / Int32ul,
    "inode_table_hi" / Int32ul,
    "free_blocks_count_hi" / Int16ul,  # 0x2C
    "free_inodes_count_hi" / Int16ul,
    "used_dirs_count_hi" / Int16ul,
    "itable_unused_hi" / Int16ul,
    "exclude_bitmap_hi" / Int32ul,  # 0x34
    "block_bitmap_csum_hi" / Int16ul,  # 0x38
    "inode_bitmap_csum_hi" / Int16ul,
    Padding(4),
)

# A wrong declaration fails at import (``assert`` would vanish under ``python -O``).
for _what, _actual, _expected in (("Superblock", Superblock.sizeof(), SUPERBLOCK_SIZE),
                                  ("GroupDescriptor", GroupDescriptor.sizeof(), DESC_SIZE_32),
                                  ("GroupDescriptor (64-bit)", GroupDescriptor.sizeof() + GroupDescriptorHigh.sizeof(),
                                   DESC_SIZE_64_MIN)):
    if _actual != _expected:
        raise ImportError(f"vhdx.format.ext: {_what} is {_actual} bytes, the spec gives {_expected}")
del _what, _actual, _expected


def descriptor_dtype(desc_size: int) -> np.dtype:
    """A numpy record type for a table of ``desc_size``-byte group descriptors.

    Its fields come from the construct declarations above (the offsets are written once), so the whole table is read
    without a loop per group.
    """
    names, formats, offsets = [], [], []
    offset = 0
    layouts = (GroupDescriptor, GroupDescriptorHigh) if desc_size >= DESC_SIZE_64_MIN else (GroupDescriptor,)
    for layout in layouts:
        for sub in layout.subcons:
            size = sub.sizeof()
            if sub.name:
                names.append(sub.name)
                formats.append(_NUMPY_OF[sub.subcon.fmtstr])
                offsets.append(offset)
            offset += size
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": desc_size})


_NUMPY_OF = {"<L": "<u4", "<H": "<u2", "<B": "u1", "<Q": "<u8"}
