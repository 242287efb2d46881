"""The free blocks of an ext2/3/4 guest volume, from its own block bitmaps (for ``compact --mode quick``).

No permissively licensed library exposes ext's block bitmaps, so the few structures needed are declared in
:mod:`vhdx.format.ext` and read here: the superblock, the group descriptor table, and one block bitmap per group.

Doubt counts as used:

- a volume that is not cleanly unmounted, has errors recorded, whose journal needs recovery, or that uses a feature
  whose effect on allocation is not known here (unknown incompatible or read-only-compatible bits, bigalloc,
  snapshots, shared blocks, compression) is refused with the reason;
- with metadata_csum, the superblock, every group descriptor and every block bitmap read must match its checksum,
  or the volume is refused (the older gdt_csum CRC16 of descriptors is not verified; the count check below is);
- a group whose bitmap disagrees with its descriptor's free count refuses the volume (e2fsck would fix it first);
- a ``BLOCK_UNINIT`` group (bitmap never written) is free except its superblock backup and descriptor blocks
  (``sparse_super``/``sparse_super2`` placement) and every group's bitmaps and inode table that lie in it (any
  descriptor, so ``flex_bg`` placement is covered); the result must equal the descriptor's free count, else the
  group is kept whole. With ``meta_bg`` such a group is kept whole (its descriptor block placement is not modelled).

References: Linux kernel documentation, Documentation/filesystems/ext4/ (blockgroup.rst: backup placement and
flex_bg; group_descr.rst: bg_flags; bitmaps.rst; checksums.rst).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vhdx.format import ext
from vhdx.format.checksum import crc32c

_MASK32 = 0xFFFFFFFF
# Hostile geometry (8 blocks a group on a huge partition) must not make quick read gigabytes of descriptors; a
# 64 TiB volume of 4 KiB blocks has 512 Ki groups, 32 MiB of 64-byte descriptors.
MAX_DESCRIPTOR_TABLE = 64 * 2**20


def _crc(seed: int, data: bytes) -> int:
    """ext4's CRC-32C: the bare register update from ``seed`` (no final inversion)."""
    return ~crc32c(data, ~seed & _MASK32) & _MASK32


@dataclass(frozen=True)
class ExtVolume:
    """The geometry and features of one ext volume, from its superblock."""

    sb: object  # the parsed construct container
    block_size: int
    blocks: int
    groups: int
    desc_size: int
    csum_seed: int

    @property
    def name(self) -> str:
        """ext4 for any ext4-only feature, ext3 with a journal, else ext2 (as blkid names them)."""
        ext4_only = (ext.INCOMPAT_EXTENTS | ext.INCOMPAT_64BIT | ext.INCOMPAT_FLEX_BG | ext.INCOMPAT_INLINE_DATA
                     | ext.INCOMPAT_CSUM_SEED | ext.INCOMPAT_LARGEDIR)
        if self.sb.feature_incompat & ext4_only or self.sb.feature_ro_compat & (
                ext.RO_COMPAT_METADATA_CSUM | ext.RO_COMPAT_GDT_CSUM | ext.RO_COMPAT_HUGE_FILE):
            return "ext4"
        return "ext3" if self.sb.feature_compat & ext.COMPAT_HAS_JOURNAL else "ext2"

    def has(self, ro_compat: int = 0, incompat: int = 0, compat: int = 0) -> bool:
        return bool(self.sb.feature_ro_compat & ro_compat or self.sb.feature_incompat & incompat
                    or self.sb.feature_compat & compat)

    @property
    def metadata_csum(self) -> bool:
        return self.has(ro_compat=ext.RO_COMPAT_METADATA_CSUM)

    def group_start(self, group: int) -> int:
        return self.sb.first_data_block + group * self.sb.blocks_per_group

    def has_super(self, group: int) -> bool:
        """Whether ``group`` holds a superblock (and descriptor) backup."""
        if group == 0:
            return True
        if self.has(compat=ext.COMPAT_SPARSE_SUPER2):
            return group in tuple(self.sb.backup_bgs)
        if group <= 1 or not self.has(ro_compat=ext.RO_COMPAT_SPARSE_SUPER):
            return True
        if not group & 1:
            return False
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False


def open_volume(read: Callable[[int, int], bytes], first_byte: int, length: int) -> ExtVolume:
    """Parse and check the superblock of the ext volume at ``first_byte`` (``length`` bytes of partition).

    Raises:
        ValueError: not an ext volume, a checksum fails, or the geometry is impossible.
    """
    raw = read(first_byte + ext.SUPERBLOCK_OFFSET, ext.SUPERBLOCK_SIZE)
    if len(raw) < ext.SUPERBLOCK_SIZE:
        raise ValueError("the ext superblock is short")
    sb = ext.Superblock.parse(raw)
    if sb.magic != ext.MAGIC:
        raise ValueError(f"no ext superblock magic (0x{sb.magic:04x})")
    metadata_csum = bool(sb.feature_ro_compat & ext.RO_COMPAT_METADATA_CSUM)
    if metadata_csum and _crc(_MASK32, raw[: ext.SUPERBLOCK_CSUM_OFFSET]) != sb.checksum:
        raise ValueError("the ext superblock fails its checksum (metadata_csum)")
    if sb.log_block_size > 6 or sb.rev_level > 1:
        raise ValueError(f"unexpected block size exponent {sb.log_block_size} or revision {sb.rev_level}")
    block_size = 1024 << sb.log_block_size
    is64 = bool(sb.feature_incompat & ext.INCOMPAT_64BIT)
    blocks = sb.blocks_count_lo | (sb.blocks_count_hi << 32 if is64 else 0)
    desc_size = sb.desc_size if is64 else ext.DESC_SIZE_32
    if is64 and (desc_size < ext.DESC_SIZE_64_MIN or desc_size & (desc_size - 1) or desc_size > block_size):
        raise ValueError(f"impossible group descriptor size {desc_size}")
    if blocks * block_size > length:
        raise ValueError(f"the ext volume ({blocks} blocks of {block_size} bytes) does not fit its partition")
    seed = sb.checksum_seed if sb.feature_incompat & ext.INCOMPAT_CSUM_SEED else _crc(_MASK32, sb.uuid)
    groups = -(-(blocks - sb.first_data_block) // sb.blocks_per_group) if sb.blocks_per_group else 0
    return ExtVolume(sb, block_size, blocks, groups, desc_size, seed)


def _check_geometry(vol: ExtVolume) -> None:
    """Raise ValueError for a geometry no mkfs makes (checked once the features are known to be understood)."""
    sb, bpg = vol.sb, vol.sb.blocks_per_group
    if not 8 <= bpg <= 8 * vol.block_size or bpg % 8 or sb.clusters_per_group != bpg or sb.first_data_block != (
            1 if vol.block_size == 1024 else 0):
        raise ValueError(f"impossible geometry ({bpg} blocks a group, first data block {sb.first_data_block})")
    if vol.blocks <= sb.first_data_block:
        raise ValueError(f"impossible block count {vol.blocks}")
    if sb.inode_size < 128 and sb.rev_level:
        raise ValueError(f"impossible inode size {sb.inode_size}")
    if vol.groups * vol.desc_size > MAX_DESCRIPTOR_TABLE:
        raise ValueError(f"{vol.groups} block groups: a descriptor table larger than quick reads "
                         f"({MAX_DESCRIPTOR_TABLE // 2**20} MiB)")


def refusal(vol: ExtVolume) -> str:
    """Why the volume's bitmaps cannot be trusted or understood ("" when they can)."""
    sb = vol.sb
    if sb.feature_incompat & ext.INCOMPAT_RECOVER:
        return "its journal needs recovery (needs_recovery); mount it in the guest or run e2fsck first"
    if sb.state & ext.STATE_ERROR:
        return "the ext volume has errors recorded; run e2fsck first"
    if not sb.state & ext.STATE_VALID:
        return "the ext volume was not cleanly unmounted; run e2fsck first"
    if sb.feature_incompat & ext.INCOMPAT_JOURNAL_DEV:
        return "an external journal device, not a file system"
    unknown = sb.feature_incompat & ~ext.INCOMPAT_UNDERSTOOD
    if unknown:
        return f"incompatible features 0x{unknown:x} whose effect on allocation is not known here"
    unknown = sb.feature_ro_compat & ~ext.RO_COMPAT_UNDERSTOOD
    if unknown:
        return f"read-only-compatible features 0x{unknown:x} (bigalloc, snapshots, shared blocks or unknown) " \
               "whose effect on allocation is not known here"
    return ""


def _descriptors(read, first_byte: int, vol: ExtVolume) -> np.ndarray:
    """The group descriptor table as a record array (one record per group)."""
    bs, sb = vol.block_size, vol.sb
    per_block = bs // vol.desc_size
    table_blocks = -(-vol.groups // per_block)
    if vol.has(incompat=ext.INCOMPAT_META_BG):
        # Descriptor block m holds groups m*per_block..: the first first_meta_bg blocks follow the superblock, the
        # others sit in the first group of their meta group (after its superblock backup, if any).
        blocks = [sb.first_data_block + 1 + m if m < sb.first_meta_bg
                  else vol.group_start(m * per_block) + vol.has_super(m * per_block) for m in range(table_blocks)]
        raw = b"".join(read(first_byte + b * bs, bs) for b in blocks)
    else:
        raw = read(first_byte + (sb.first_data_block + 1) * bs, table_blocks * bs)
    if len(raw) < table_blocks * bs:
        raise ValueError("the group descriptor table is short")
    table = np.frombuffer(raw, dtype=ext.descriptor_dtype(vol.desc_size), count=vol.groups)
    if vol.metadata_csum:
        for group in range(vol.groups):  # one CRC per group (not per block)
            desc = bytearray(raw[group * vol.desc_size : (group + 1) * vol.desc_size])
            desc[ext.DESC_CSUM_OFFSET : ext.DESC_CSUM_OFFSET + 2] = b"\0\0"
            if _crc(vol.csum_seed, struct.pack("<I", group) + bytes(desc)) & 0xFFFF != table["checksum"][group]:
                raise ValueError(f"the descriptor of block group {group} fails its checksum (metadata_csum)")
    return table


def _wide(table: np.ndarray, name: str, shift: int) -> np.ndarray:
    """A descriptor field with its _hi half (64-byte descriptors) joined on."""
    value = table[f"{name}_lo"].astype(np.int64)
    if f"{name}_hi" in table.dtype.names:
        value |= table[f"{name}_hi"].astype(np.int64) << shift
    return value


@dataclass(frozen=True)
class _Metadata:
    """Every group's bitmaps and inode table as block ranges [start, end), sorted by start."""

    starts: np.ndarray
    ends: np.ndarray
    longest: int

    @classmethod
    def of(cls, table: np.ndarray, vol: ExtVolume) -> _Metadata:
        sb = vol.sb
        inode_size = sb.inode_size if sb.rev_level else 128
        itable = -(-sb.inodes_per_group * inode_size // vol.block_size)
        block_bitmap, inode_bitmap = _wide(table, "block_bitmap", 32), _wide(table, "inode_bitmap", 32)
        inode_table = _wide(table, "inode_table", 32)
        starts = np.concatenate((block_bitmap, inode_bitmap, inode_table))
        ends = np.concatenate((block_bitmap + 1, inode_bitmap + 1, inode_table + itable))
        if len(starts) and (starts.min() < sb.first_data_block or ends.max() > vol.blocks):
            raise ValueError("a group's bitmap or inode table lies outside the volume")
        order = np.argsort(starts, kind="stable")
        return cls(starts[order], ends[order], max(itable, 1))

    def used_in(self, first: int, count: int) -> np.ndarray:
        """Mask over the blocks [first, first + count): True where some group's metadata lies."""
        used = np.zeros(count, dtype=bool)
        lo = np.searchsorted(self.starts, first - self.longest, side="left")
        hi = np.searchsorted(self.starts, first + count, side="left")
        for s, e in zip(self.starts[lo:hi].tolist(), self.ends[lo:hi].tolist(), strict=True):
            used[max(s - first, 0) : max(min(e - first, count), 0)] = True
        return used


def _uninit_used(vol: ExtVolume, group: int, count: int, meta: _Metadata) -> np.ndarray | None:
    """The used mask of a BLOCK_UNINIT group, or None when it is not known exactly (keep the group whole)."""
    if vol.has(incompat=ext.INCOMPAT_META_BG):
        return None
    used = meta.used_in(vol.group_start(group), count)
    if vol.has_super(group):
        per_block = vol.block_size // vol.desc_size
        used[: 1 + -(-vol.groups // per_block) + vol.sb.reserved_gdt_blocks] = True
    return used


def free_ranges(read: Callable[[int, int], bytes], first_byte: int, vol: ExtVolume) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges [start, end) of the disk that hold only free blocks of the volume at ``first_byte``.

    Raises:
        ValueError: a descriptor or bitmap fails its checksum, lies outside the volume, or disagrees with its count.
    """
    sb, bs = vol.sb, vol.block_size
    _check_geometry(vol)
    table = _descriptors(read, first_byte, vol)
    meta = _Metadata.of(table, vol)
    free_counts = _wide(table, "free_blocks_count", 16)
    group_csum = vol.has(ro_compat=ext.RO_COMPAT_GDT_CSUM | ext.RO_COMPAT_METADATA_CSUM)
    bitmap_bytes = sb.clusters_per_group // 8
    csums = _wide(table, "block_bitmap_csum", 16) if vol.metadata_csum else None
    wide_csum = vol.desc_size >= ext.DESC_SIZE_64_MIN
    block_bitmaps = _wide(table, "block_bitmap", 32)
    found_starts, found_ends = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for group in range(vol.groups):  # one bitmap per group; the blocks within it are handled as arrays
        first = vol.group_start(group)
        count = min(sb.blocks_per_group, vol.blocks - first)
        if group_csum and table["flags"][group] & ext.BG_BLOCK_UNINIT:
            used = _uninit_used(vol, group, count, meta)
            if used is None or int(count - used.sum()) != int(free_counts[group]):
                continue  # placement not known exactly: the whole group counts as used
        else:
            where = int(block_bitmaps[group])
            raw = read(first_byte + where * bs, bs)
            if len(raw) < bs:
                raise ValueError(f"the block bitmap of group {group} is short")
            if csums is not None:
                crc = _crc(vol.csum_seed, raw[:bitmap_bytes])
                if (crc if wide_csum else crc & 0xFFFF) != int(csums[group]):
                    raise ValueError(f"the block bitmap of group {group} (block {where}) fails its checksum "
                                     "(metadata_csum); run e2fsck first")
            used = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[:count].astype(bool)
            if int(count - used.sum()) != int(free_counts[group]):
                raise ValueError(f"the block bitmap of group {group} disagrees with its free count; run e2fsck first")
        edges = np.diff(np.concatenate(([0], (~used).astype(np.int8), [0])))
        found_starts.append(first + np.flatnonzero(edges == 1))
        found_ends.append(first + np.flatnonzero(edges == -1))
    starts, ends = np.concatenate(found_starts), np.concatenate(found_ends)
    return first_byte + starts * bs, first_byte + ends * bs
