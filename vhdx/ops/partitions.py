"""The MBR or GPT partitions of a virtual disk, read through its chain (like ``fdisk -l`` on the flat image).

GPT is chosen when the MBR is protective (type 0xEE); its header CRC is checked and the backup header (last
LBA) is used when the primary one fails. MBR extended partitions are followed through their EBR chain;
logical partitions are numbered from 5, as Linux does. A disk without a partition table has no partitions.

``resize --to-minimum`` shrinks to where the last partition ends (``partition_table``), and after any resize the
GPT backup copy is rewritten at the disk's new end (``move_gpt_backup``). ``Resize-VHD`` leaves the backup header
at the old end for the guest to fix; we write the backup entry array and header at the new end and point the
primary header at them (alternate LBA, last usable LBA), so the guest sees a consistent table at once. The
minimum size keeps room for that backup copy.

References: UEFI Specification 2.10 §5.2-§5.3.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from construct import ConstructError

from vhdx.errors import FormatError, InvalidRequestError
from vhdx.format import partition_table as pt
from vhdx.structures.bat import ceil_div

MAX_LOGICAL = 128  # EBR chain length bound: a looping chain must not hang the reader


@dataclass(frozen=True)
class Partition:
    number: int  # as Linux numbers them: GPT 1.., MBR primary 1-4, logical 5..
    scheme: str  # "mbr" or "gpt"
    start: int  # byte offset in the virtual disk
    length: int  # bytes
    type: str  # MBR type byte as "0x83", or the GPT type GUID
    name: str | None = None  # GPT partition name
    guid: str | None = None  # GPT unique partition GUID
    bootable: bool = False  # MBR active flag

    def to_json(self) -> dict:
        return asdict(self)


Reader = Callable[[int, int], bytes]  # (offset, length) -> bytes of the virtual disk


def read_partitions(read: Reader, disk_size: int, sector_size: int) -> list[Partition]:
    """Every partition of the disk READ gives (``disk_size`` bytes, LBAs of ``sector_size`` bytes)."""
    if disk_size < 2 * sector_size:
        return []
    mbr = pt.Mbr.parse(read(0, 512))
    if mbr.signature != pt.MBR_SIGNATURE:
        return []
    if any(e.type == pt.GPT_PROTECTIVE_TYPE for e in mbr.entries):
        return _gpt(read, disk_size, sector_size)
    return _mbr(read, mbr, disk_size, sector_size)


def _check_bounds(part: Partition, disk_size: int, structure: str, offset: int) -> Partition:
    if part.length <= 0 or part.start + part.length > disk_size:
        raise FormatError(f"partition {part.number} ({part.start:#x}, {part.length} bytes) lies outside the "
                          f"{disk_size}-byte virtual disk", structure=structure, offset=offset)
    return part


def _mbr(read: Reader, mbr, disk_size: int, ss: int) -> list[Partition]:
    parts = []
    for i, e in enumerate(mbr.entries):
        if e.type == 0 or e.sectors == 0:
            continue
        at = pt.MBR_ENTRIES_OFFSET + 16 * i
        parts.append(_check_bounds(Partition(i + 1, "mbr", e.lba_first * ss, e.sectors * ss, f"{e.type:#04x}",
                                             bootable=e.status == 0x80), disk_size, f"MBR entry {i + 1}", at))
        if e.type in pt.MBR_EXTENDED_TYPES:
            parts.extend(_logical(read, e.lba_first, disk_size, ss))
    return parts


def _logical(read: Reader, extended_lba: int, disk_size: int, ss: int) -> list[Partition]:
    parts, ebr_lba, seen = [], extended_lba, set()
    while ebr_lba not in seen and len(parts) < MAX_LOGICAL and (ebr_lba + 1) * ss <= disk_size:
        seen.add(ebr_lba)
        ebr = pt.Mbr.parse(read(ebr_lba * ss, 512))
        if ebr.signature != pt.MBR_SIGNATURE:
            raise FormatError("extended boot record without the 0x55AA signature", structure="EBR",
                              offset=ebr_lba * ss)
        this, nxt = ebr.entries[0], ebr.entries[1]
        if this.type != 0 and this.sectors != 0:
            number = 5 + len(parts)
            parts.append(_check_bounds(Partition(number, "mbr", (ebr_lba + this.lba_first) * ss, this.sectors * ss,
                                                 f"{this.type:#04x}", bootable=this.status == 0x80), disk_size,
                                       f"EBR of partition {number}", ebr_lba * ss + pt.MBR_ENTRIES_OFFSET))
        if nxt.type not in pt.MBR_EXTENDED_TYPES or nxt.lba_first == 0:
            break
        ebr_lba = extended_lba + nxt.lba_first
    return parts


def _gpt_header(read: Reader, lba: int, ss: int):
    raw = read(lba * ss, ss)
    try:
        header = pt.GptHeader.parse(raw)
    except ConstructError:
        return None
    if not 92 <= header.header_size <= ss:
        return None
    body = bytearray(raw[:header.header_size])
    body[16:20] = bytes(4)
    return header if zlib.crc32(body) == header.header_crc32 else None


def _gpt(read: Reader, disk_size: int, ss: int) -> list[Partition]:
    header = _gpt_header(read, 1, ss) or _gpt_header(read, disk_size // ss - 1, ss)
    if header is None:
        raise FormatError("neither the primary nor the backup GPT header is valid (signature or CRC)",
                          structure="GPT header", offset=ss)
    if not 128 <= header.entry_size <= 4096 or header.entry_count > 4096:
        raise FormatError(f"implausible GPT entry array ({header.entry_count} x {header.entry_size} bytes)",
                          structure="GPT header", offset=header.current_lba * ss)
    table_at = header.entries_lba * ss
    table = read(table_at, header.entry_count * header.entry_size)
    if zlib.crc32(table) != header.entries_crc32:
        raise FormatError("GPT partition entry array CRC mismatch", structure="GPT entries", offset=table_at)
    parts = []
    for i in range(header.entry_count):
        at = i * header.entry_size
        e = pt.GptEntry.parse(table[at:at + 128])
        if e.type_guid == pt.UNUSED_GPT_TYPE:
            continue
        part = Partition(i + 1, "gpt", e.first_lba * ss, (e.last_lba - e.first_lba + 1) * ss, str(e.type_guid),
                         name=e.name.rstrip("\x00") or None, guid=str(e.unique_guid))
        parts.append(_check_bounds(part, disk_size, f"GPT entry {i + 1}", table_at + at))
    return parts


def image_partitions(image) -> list[Partition]:
    """Partitions of an opened VhdxImage (read through its chain)."""
    return read_partitions(image.read, image.virtual_size, image.geometry.logical_sector_size)


def select(partitions: list[Partition], number: int) -> Partition:
    """Partition NUMBER, or an error naming the numbers there are."""
    for part in partitions:
        if part.number == number:
            return part
    have = ", ".join(str(p.number) for p in partitions) or "none: no MBR or GPT partition table"
    raise InvalidRequestError(f"no partition {number} on this disk (partitions: {have})")


class PartitionView:
    """One partition of an opened disk, seen as a disk of its own (for serve, mount): offsets shift by its start.

    Offers what the exporters use of a VhdxImage: ``path``, ``layers``, ``virtual_size``, ``read``,
    ``readinto`` and ``extents``.
    """

    def __init__(self, image, partition: Partition) -> None:
        self.image = image
        self.partition = partition
        self.path = image.path
        self.virtual_size = partition.length

    @property
    def layers(self):
        return self.image.layers

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self.virtual_size - offset))
        return self.image.readinto(self.partition.start + offset, view[:n]) if n else 0

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(max(0, min(length, self.virtual_size - offset)))
        self.readinto(offset, buf)
        return bytes(buf)

    def extents(self, start: int = 0, end: int | None = None):
        end = self.virtual_size if end is None else min(end, self.virtual_size)
        ext = self.image.extents(self.partition.start + start, self.partition.start + end)
        return replace(ext, start=ext.start - self.partition.start)


# --- where the partitions end, and the GPT backup copy (resize) ----------------------------------------------
@dataclass(frozen=True)
class PartitionTable:
    """The partition table of a disk as a resize sees it."""

    kind: str  # "mbr", "gpt" or "none"
    partitions: tuple[Partition, ...]
    gpt_backup_bytes: int = 0  # room the backup GPT (entry array + header) needs at the end of the disk

    @property
    def end(self) -> int:
        """End of the last partition (0 without partitions); an extended partition covers its logical ones."""
        return max((p.start + p.length for p in self.partitions), default=0)

    @property
    def minimum_size(self) -> int:
        return self.end + self.gpt_backup_bytes


def _gpt_backup_bytes(header, ss: int) -> int:
    return ceil_div(header.entry_count * header.entry_size, ss) * ss + ss


def read_partition_table(image) -> PartitionTable:
    """The partitions of an opened disk with the room its GPT backup copy needs."""
    parts = tuple(image_partitions(image))
    if not parts:
        return PartitionTable("none", ())
    if parts[0].scheme == "mbr":
        return PartitionTable("mbr", parts)
    ss = image.logical_sector_size
    header = _gpt_header(image.read, 1, ss) or _gpt_header(image.read, image.virtual_size // ss - 1, ss)
    return PartitionTable("gpt", parts, _gpt_backup_bytes(header, ss))


def _with_crc(header, **changes) -> bytes:
    fields = {k: v for k, v in dict(header).items() if not k.startswith("_")}
    fields.update(changes, header_crc32=0)
    raw = bytearray(pt.GptHeader.build(fields))
    raw[16:20] = zlib.crc32(raw[: header.header_size]).to_bytes(4, "little")
    return bytes(raw)


def move_gpt_backup(image) -> bool:
    """After a resize: write the backup GPT at the disk's end and point the primary header at it (writable image).

    Returns False when there is nothing to do (no valid primary GPT, or its backup is at the end already). The
    entries are copied from the primary array (their CRC is unchanged).
    """
    ss = image.logical_sector_size
    header = _gpt_header(image.read, 1, ss)
    last_lba = image.virtual_size // ss - 1
    if header is None or header.header_size != pt.GptHeader.sizeof() or header.backup_lba == last_lba:
        return False
    entries = image.read(header.entries_lba * ss, header.entry_count * header.entry_size)
    entries_lba = last_lba - ceil_div(len(entries), ss)
    backup = _with_crc(header, current_lba=last_lba, backup_lba=1, last_usable_lba=entries_lba - 1,
                       entries_lba=entries_lba)
    primary = _with_crc(header, backup_lba=last_lba, last_usable_lba=entries_lba - 1)
    image.write(entries_lba * ss, entries)
    image.write(last_lba * ss, backup.ljust(ss, b"\0"))
    image.flush()  # the backup exists before the primary names it
    image.write(ss, primary)
    image.flush()
    return True
