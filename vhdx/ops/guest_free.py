"""The guest's free space, for ``compact --mode quick``: which bytes of the virtual disk only hold free clusters.

Partitions come from the MBR or GPT (:mod:`vhdx.ops.partitions`); a disk without a table is read as one volume. Each
partition whose type is a file system type is probed with The Sleuth Kit (pytsk3, the only permissively licensed
reader here that exposes allocation maps), and its allocation map is read through it:

- NTFS: the ``$Bitmap`` metadata file (one bit per cluster);
- FAT12/16/32: the ``$FAT1``/``$FAT2`` virtual files (a cluster is free where its entry is 0 in every copy); the
  cluster geometry comes from the boot sector (:mod:`vhdx.format.fat_boot`), checked against The Sleuth Kit's own
  sector count and FAT places;
- ext2/3/4: its block bitmaps, read by :mod:`vhdx.ops.guest_ext` (pytsk3 and pyfsext expose no bitmaps, and the
  readers that do, such as dissect.extfs, are AGPL, which an MIT package may not import).

Everything else is never free: the partition table, gaps between partitions, extended partitions, partitions of
other types or whose file system is not supported (exFAT, ...), and bytes of a partition past its file system.
Doubt counts as used: a file system not cleanly unmounted (NTFS dirty flag or hibernated Windows, FAT without its
clean-shutdown bit, ext not cleanly unmounted or with a journal to recover), overlapping partitions, a FAT geometry
the boot sector and The Sleuth Kit disagree on, and anything that fails to read.

References: UEFI §5.2-5.3 (partition types); NTFS $Bitmap and $Volume (VOLUME_INFORMATION flags);
Microsoft FAT specification (BPB, FAT entry 1 clean-shutdown bit, free entry 0).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

from vhdx.disk.image import VhdxImage
from vhdx.errors import FormatError, UnsupportedError, VhdxError
from vhdx.format import ext, fat_boot
from vhdx.ops import guest_ext
from vhdx.ops.partitions import read_partitions

# Partition types that hold a file system quick may read (others are kept whole).
MBR_FS_TYPES = frozenset({0x01, 0x04, 0x06, 0x07, 0x0B, 0x0C, 0x0E, 0x11, 0x14, 0x16, 0x17, 0x1B, 0x1C, 0x1E, 0x27,
                          0x83})
MBR_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
GPT_FS_TYPES = frozenset(uuid.UUID(u) for u in (
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7",  # Microsoft basic data
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac",  # Windows recovery
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",  # EFI system
    "0fc63daf-8483-4772-8e79-3d69d8477de4",  # Linux file system data
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",  # Linux root (x86-64)
    "44479540-f297-41b2-9af7-d131d5f0458a",  # Linux root (x86)
    "b921b045-1df0-41c3-af44-4c6f280d3fae",  # Linux root (ARM64)
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915",  # Linux /home
    "3b8f8425-20e0-4f3b-907f-1a25a76f98e8",  # Linux /srv
    "bc13c2ff-59e6-4262-a352-b275fd6f7172",  # Linux /boot (XBOOTLDR)
))

NTFS_VOLUME_DIRTY = 0x1
BITMAP_SPAN = 8 * 2**20  # bytes of an NTFS $Bitmap read at once (64 Mi clusters)
FAT_SPAN = 3 * 2**20  # bytes of a FAT copy read at once: a multiple of 12 (whole FAT12 pairs, FAT16/32 entries)
FAT_CLEAN_BIT = {12: 0, 16: 0x8000, 32: 0x08000000}  # in FAT entry 1; FAT12 has none


@dataclass(frozen=True)
class Partition:
    """A byte range of the virtual disk quick may read as one file system."""

    first_byte: int
    end_byte: int  # exclusive
    type_id: str  # MBR type as "0x83", GPT type GUID; "" for a disk without a partition table

    @property
    def extended(self) -> bool:
        return self.type_id.startswith("0x") and int(self.type_id, 16) in MBR_EXTENDED_TYPES


def guest_partitions(image: VhdxImage) -> tuple[str, list[Partition]]:
    """The table kind ("mbr", "gpt", "none") and the partitions, clipped to the disk (the whole disk without a table).

    Raises:
        FormatError: the partition table cannot be read.
    """
    parts = read_partitions(image.read, image.virtual_size, image.logical_sector_size)
    if not parts:  # a volume boot sector also ends in 55 AA: read the disk as one volume
        return "none", [Partition(0, image.virtual_size, "")]
    return parts[0].scheme, [Partition(p.start, min(p.start + p.length, image.virtual_size), p.type) for p in parts]


@dataclass(frozen=True)
class VolumeReport:
    """What quick read of one partition (or of the whole disk without a table), or why it skipped it."""

    first_byte: int
    end_byte: int
    file_system: str  # "ntfs", "ext4", ..., or "" when unknown
    free_bytes: int = 0
    skipped: str = ""  # why nothing of it was released

    def describe(self, name: str) -> str:
        where = f"{name} (bytes {self.first_byte}-{self.end_byte})"
        if self.skipped:
            return f"{where}: {self.file_system + ' ' if self.file_system else ''}skipped ({self.skipped})"
        return f"{where}: {self.file_system}, {self.free_bytes / 2**20:,.1f} MiB in free clusters"


@dataclass
class GuestFreeMap:
    """Sorted, disjoint byte ranges [start, end) of the virtual disk that only hold free clusters."""

    table: str
    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ends: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    volumes: list[VolumeReport] = field(default_factory=list)

    def describe(self) -> list[str]:
        table = {"none": "no partition table (read as one volume)"}.get(self.table, f"{self.table} partition table")
        if self.table.startswith("unreadable"):
            table = f"partition table {self.table}"
        names = ["the whole disk"] if self.table == "none" else [f"partition {i + 1}" for i in range(len(self.volumes))]
        return [table, *(v.describe(name) for name, v in zip(names, self.volumes, strict=True))]

    def free_blocks(self, blocks: np.ndarray, block_size: int, virtual_size: int) -> np.ndarray:
        """Mask over ``blocks``: every byte of the block (up to the disk's end) lies in one free range."""
        first = np.asarray(blocks, dtype=np.int64) * block_size
        end = np.minimum(first + block_size, virtual_size)
        if not len(self.starts):
            return np.zeros(len(first), dtype=bool)
        i = np.searchsorted(self.starts, first, side="right") - 1
        inside = i >= 0
        result = np.zeros(len(first), dtype=bool)
        result[inside] = self.ends[i[inside]] >= end[inside]
        return result


def _runs(free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) index runs of True in ``free``."""
    edges = np.diff(np.concatenate(([0], free.astype(np.int8), [0])))
    return np.flatnonzero(edges == 1).astype(np.int64), np.flatnonzero(edges == -1).astype(np.int64)


def _unpack(raw: bytes, count: int) -> np.ndarray:
    """The first ``count`` bits of an allocation bitmap (bit 0 of byte 0 first), True where used."""
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[:count].astype(bool)
    if len(bits) < count:
        raise ValueError(f"the allocation bitmap is short ({len(bits)} of {count} bits)")
    return bits


def _tsk_image(image: VhdxImage):
    """A pytsk3 image that reads the virtual disk (its whole chain)."""
    import pytsk3  # noqa: PLC0415 - optional dependency (the guestfs extra)

    class DiskImg(pytsk3.Img_Info):
        def __init__(self) -> None:
            super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

        def read(self, offset: int, size: int) -> bytes:
            return image.read(offset, max(0, min(size, image.virtual_size - offset)))

        def get_size(self) -> int:
            return image.virtual_size

        def close(self) -> None:
            pass

    return DiskImg()


def _ntfs_clean(fs) -> str:
    """Why the NTFS volume's bitmap cannot be trusted ("" when it can)."""
    import pytsk3  # noqa: PLC0415 - optional dependency (the guestfs extra)

    volume = fs.open("/$Volume")
    for attr in volume:
        if attr.info.type == pytsk3.TSK_FS_ATTR_TYPE_NTFS_VINFO:
            info = volume.read_random(0, attr.info.size, attr.info.type, attr.info.id)
            if len(info) < 12:
                return "its volume information is short"
            if int.from_bytes(info[10:12], "little") & NTFS_VOLUME_DIRTY:
                return "the NTFS volume is marked dirty; run chkdsk in the guest first"
            break
    else:
        return "the NTFS volume has no volume information"
    try:
        hiberfil = fs.open("/hiberfil.sys")
    except OSError:
        return ""
    if hiberfil.info.meta.size >= 4 and hiberfil.read_random(0, 4).lower() in (b"hibr", b"wake"):
        return "Windows is hibernated (fast startup) on it: its on-disk bitmap may be stale"
    return ""


def _ntfs_free(fs, part: Partition) -> tuple[np.ndarray, np.ndarray]:
    cluster, count = fs.info.block_size, fs.info.block_count
    if count * cluster > part.end_byte - part.first_byte:
        raise ValueError("the NTFS volume is larger than its partition")
    bitmap = fs.open("/$Bitmap")
    if bitmap.info.meta.size * 8 < count:
        raise ValueError(f"$Bitmap is short ({bitmap.info.meta.size * 8} of {count} bits)")
    runs = [(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))]
    for first in range(0, count, BITMAP_SPAN * 8):  # bounded memory; touching runs are merged later
        n = min(BITMAP_SPAN * 8, count - first)
        starts, ends = _runs(~_unpack(bitmap.read_random(first // 8, (n + 7) // 8), n))
        runs.append((first + starts, first + ends))
    starts, ends = (np.concatenate(r) for r in zip(*runs, strict=True))
    return part.first_byte + starts * cluster, part.first_byte + ends * cluster


def _fat_entries(raw: bytes, bits: int) -> np.ndarray:
    """The entries of one FAT copy as integers (FAT12 packs two entries in three bytes)."""
    data = np.frombuffer(raw, dtype=np.uint8)
    if bits == 16:
        return data[: len(data) // 2 * 2].view("<u2").astype(np.uint32)
    if bits == 32:
        return data[: len(data) // 4 * 4].view("<u4") & 0x0FFFFFFF
    triples = data[: len(data) // 3 * 3].reshape(-1, 3).astype(np.uint32)
    pairs = np.stack((triples[:, 0] | (triples[:, 1] & 0xF) << 8, triples[:, 1] >> 4 | triples[:, 2] << 4), axis=1)
    return pairs.ravel()


def _fat_free(image: VhdxImage, fs, part: Partition, bits: int) -> tuple[np.ndarray, np.ndarray]:
    import pytsk3  # noqa: PLC0415 - optional dependency (the guestfs extra)

    bpb = fat_boot.BiosParameterBlock.parse(image.read(part.first_byte, fat_boot.BOOT_SECTOR_SIZE))
    ss, per_cluster = bpb.bytes_per_sector, bpb.sectors_per_cluster
    total = bpb.total_sectors_16 or bpb.total_sectors_32
    fat_sectors = bpb.fat_sectors_16 or bpb.fat_sectors_32
    # The Sleuth Kit's blocks are the volume's sectors: it must have read the same geometry as the boot sector says.
    if bpb.signature != fat_boot.BOOT_SIGNATURE or ss != fs.info.block_size or total != fs.info.block_count:
        raise ValueError("the boot sector and The Sleuth Kit disagree on the volume's sectors")
    if not per_cluster or per_cluster & (per_cluster - 1) or bpb.fat_count not in (1, 2):
        raise ValueError(f"unexpected geometry ({per_cluster} sectors a cluster, {bpb.fat_count} FATs)")
    if total * ss > part.end_byte - part.first_byte:
        raise ValueError("the FAT volume is larger than its partition")
    root_sectors = -(-bpb.root_entries * fat_boot.DIR_ENTRY_SIZE // ss)
    first_data = bpb.reserved_sectors + bpb.fat_count * fat_sectors + root_sectors
    clusters = (total - first_data) // per_cluster
    tables = []
    for copy in range(bpb.fat_count):  # free only where every copy says so
        table = fs.open(f"/$FAT{copy + 1}")  # The Sleuth Kit's virtual file of each FAT copy
        where = [(run.addr, run.len) for attr in table if attr.info.type == pytsk3.TSK_FS_ATTR_TYPE_DEFAULT
                 for run in attr]
        if where != [(bpb.reserved_sectors + copy * fat_sectors, fat_sectors)]:
            raise ValueError(f"The Sleuth Kit places FAT copy {copy + 1} elsewhere than the boot sector")
        tables.append(table)
    fat_bytes = fat_sectors * ss
    needed = clusters + 2  # entries 0 and 1 are reserved
    if (fat_bytes // 3 * 2 if bits == 12 else fat_bytes * 8 // bits) < needed:
        raise ValueError("the FAT is shorter than the volume's clusters")
    per_window = FAT_SPAN * 8 // bits  # entries (FAT_SPAN is a multiple of 12: whole FAT12 pairs)
    runs = [(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))]
    for first in range(0, needed, per_window):  # bounded memory; touching runs are merged later
        n = min(per_window, needed - first)
        free = np.ones(n, dtype=bool)
        offset = first * bits // 8
        size = min(-(-n // 2) * 3 if bits == 12 else n * bits // 8, fat_bytes - offset)
        for table in tables:
            entries = _fat_entries(_fat_window(table, offset, size), bits)[:n]
            if len(entries) < n:
                raise ValueError("a FAT copy reads short")
            if first == 0 and FAT_CLEAN_BIT[bits] and not entries[1] & FAT_CLEAN_BIT[bits]:
                raise UnsupportedError("the FAT volume was not cleanly unmounted; run fsck.fat / chkdsk first")
            free &= entries == 0
        if first == 0:
            free[:2] = False
        starts, ends = _runs(free)
        runs.append((first + starts, first + ends))
    starts, ends = (np.concatenate(r) - 2 for r in zip(*runs, strict=True))  # cluster 2 is the first data cluster
    data = part.first_byte + first_data * ss
    return data + starts * per_cluster * ss, data + ends * per_cluster * ss


def _fat_window(table, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of one FAT copy (The Sleuth Kit's $FATn file)."""
    return table.read_random(offset, size)


def _type_skip(table: str, part: Partition) -> str:
    """Why a partition's type rules it out ("" when it may hold a file system quick reads)."""
    if table == "none":
        return ""
    if table == "mbr":
        if part.extended:
            return "extended partition: a container, not read as a file system"
        known = int(part.type_id, 16) in MBR_FS_TYPES
    else:
        known = uuid.UUID(part.type_id) in GPT_FS_TYPES
    return "" if known else f"partition type {part.type_id} is not a file system type"


def _overlapping(parts: list[Partition]) -> set[int]:
    """Indexes of partitions that share bytes with another one (an extended partition holds its logical ones)."""
    return {i for i, p in enumerate(parts) for j, o in enumerate(parts)
            if i != j and not p.extended and not o.extended and o.first_byte < p.end_byte and p.first_byte < o.end_byte}


def _ext_magic(image: VhdxImage, part: Partition) -> bool:
    at = part.first_byte + ext.SUPERBLOCK_OFFSET + 0x38  # s_magic
    return at + 2 <= part.end_byte and image.read(at, 2) == ext.MAGIC.to_bytes(2, "little")


def _read_ext(image: VhdxImage, part: Partition, name: str) -> tuple[VolumeReport, tuple]:
    """Free ranges of an ext2/3/4 volume from its own block bitmaps (:mod:`vhdx.ops.guest_ext`)."""
    length = part.end_byte - part.first_byte
    try:
        vol = guest_ext.open_volume(image.read, part.first_byte, length)
        name = name or vol.name
        reason = guest_ext.refusal(vol)
        if reason:
            return VolumeReport(part.first_byte, part.end_byte, name, skipped=reason), ()
        starts, ends = guest_ext.free_ranges(image.read, part.first_byte, vol)
    except (OSError, ValueError, VhdxError) as exc:
        return VolumeReport(part.first_byte, part.end_byte, name or "ext",
                            skipped=f"could not read its allocation map: {exc}"), ()
    except Exception as exc:  # hostile bytes: release nothing of it
        return VolumeReport(part.first_byte, part.end_byte, name or "ext",
                            skipped=f"could not read its allocation map ({type(exc).__name__}: {exc})"), ()
    return _report(part, name, starts, ends)


def _report(part: Partition, name: str, starts: np.ndarray, ends: np.ndarray) -> tuple[VolumeReport, tuple]:
    ends = np.minimum(ends, part.end_byte)
    starts, ends = starts[ends > starts], ends[ends > starts]
    return VolumeReport(part.first_byte, part.end_byte, name, int((ends - starts).sum())), (starts, ends)


def _read_volume(image: VhdxImage, img, table: str, part: Partition, overlaps: bool) -> tuple[VolumeReport, tuple]:
    import pytsk3  # noqa: PLC0415 - optional dependency (the guestfs extra)

    def skip(reason: str, fs_name: str = "") -> tuple[VolumeReport, tuple]:
        return VolumeReport(part.first_byte, part.end_byte, fs_name, skipped=reason), ()

    reason = _type_skip(table, part)
    if reason:
        return skip(reason)
    if overlaps:
        return skip("overlaps another partition")
    try:
        fs = pytsk3.FS_Info(img, offset=part.first_byte)
    except OSError:
        if _ext_magic(image, part):  # newer ext features The Sleuth Kit does not know: our own reader decides
            return _read_ext(image, part, "")
        return skip("no file system The Sleuth Kit recognises")
    ftype = fs.info.ftype
    names = {pytsk3.TSK_FS_TYPE_NTFS: "ntfs", pytsk3.TSK_FS_TYPE_EXT2: "ext2", pytsk3.TSK_FS_TYPE_EXT3: "ext3",
             pytsk3.TSK_FS_TYPE_EXT4: "ext4", pytsk3.TSK_FS_TYPE_FAT12: "fat12", pytsk3.TSK_FS_TYPE_FAT16: "fat16",
             pytsk3.TSK_FS_TYPE_FAT32: "fat32", pytsk3.TSK_FS_TYPE_EXFAT: "exfat"}
    name = names.get(ftype, str(ftype).removeprefix("TSK_FS_TYPE_").lower())
    try:
        if name == "ntfs":
            reason = _ntfs_clean(fs)
            if reason:
                return skip(reason, name)
            starts, ends = _ntfs_free(fs, part)
        elif name.startswith("ext"):
            return _read_ext(image, part, name)
        elif name.startswith("fat"):
            starts, ends = _fat_free(image, fs, part, int(name[3:]))
        else:
            return skip(f"{name}: reading its free-space map is not supported", name)
    except (OSError, ValueError, UnsupportedError) as exc:
        return skip(f"could not read its allocation map: {exc}", name)
    except Exception as exc:  # a library failing on hostile bytes: release nothing of it
        return skip(f"could not read its allocation map ({type(exc).__name__}: {exc})", name)
    return _report(part, name, starts, ends)


def read_free_map(image: VhdxImage) -> GuestFreeMap:
    """The byte ranges of ``image``'s guest that only hold free clusters, and what was read or skipped.

    Raises:
        UnsupportedError: the libraries (the ``guestfs`` extra) are not installed.
    """
    try:
        import pytsk3  # noqa: F401, PLC0415
    except ImportError:
        raise UnsupportedError("quick compaction reads guest file systems with pytsk3: install it with "
                               "`pip install 'vhdx-chain[guestfs]'`",
                               path=image.path) from None
    try:
        kind, parts = guest_partitions(image)
    except FormatError as exc:
        return GuestFreeMap(f"unreadable ({exc.message}; the guest is not read)")
    img = _tsk_image(image)
    result = GuestFreeMap(kind)
    ranges = []
    overlapping = _overlapping(parts)
    for i, part in enumerate(parts):
        report, found = _read_volume(image, img, kind, part, i in overlapping)
        result.volumes.append(report)
        if found:
            ranges.append(found)
    if ranges and sum(len(r[0]) for r in ranges):
        starts = np.concatenate([r[0] for r in ranges])
        ends = np.concatenate([r[1] for r in ranges])
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], ends[order]
        # Merge touching ranges, so that a block spanning two of them counts as free.
        new = np.concatenate(([True], starts[1:] != ends[:-1]))
        result.starts = starts[new]
        result.ends = ends[np.concatenate((np.flatnonzero(new)[1:] - 1, [len(ends) - 1]))]
    return result
