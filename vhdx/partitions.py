"""The guest's partition table (MBR or GPT) on a virtual disk: where partitions end, and the GPT backup copy.

``resize --to-minimum`` shrinks to where the last partition ends; after any resize the GPT backup copy is rewritten
at the disk's new end.

What we do with GPT: ``Resize-VHD`` leaves the backup header at the old end for the guest to fix. We rewrite it at the
new end (backup entry array, then backup header), and point the primary header at it (alternate LBA and last usable
LBA), so the guest sees a consistent table at once. The minimum size keeps room for that backup copy.

References: UEFI specification §5.2 (legacy MBR), §5.3 (GPT header and entries).
"""

from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass

from vhdx.bat import ceil_div
from vhdx.errors import FormatError
from vhdx.format import layouts
from vhdx.image import VhdxImage


@dataclass(frozen=True)
class Partition:
    first_byte: int
    end_byte: int  # exclusive
    type_id: str = ""  # MBR: "0x07"; GPT: the type GUID ("" without a table)


@dataclass(frozen=True)
class PartitionTable:
    kind: str  # "mbr", "gpt" or "none"
    partitions: tuple[Partition, ...]
    gpt_backup_bytes: int = 0  # room the backup GPT (entries + header) needs at the end of the disk

    @property
    def end(self) -> int:
        """End of the last partition (0 without partitions)."""
        return max((p.end_byte for p in self.partitions), default=0)

    @property
    def minimum_size(self) -> int:
        return self.end + self.gpt_backup_bytes


def _gpt_entries_bytes(header) -> int:
    return header.number_of_entries * header.entry_size


def read_gpt_header(image: VhdxImage, lba: int):
    lss = image.logical_sector_size
    raw = image.read(lba * lss, lss)
    if len(raw) < lss:
        return None  # a disk too small to hold one
    header = layouts.GptHeader.parse(raw)
    if header.signature != layouts.GPT_SIGNATURE:
        return None
    check = bytearray(raw[: header.header_size])
    check[16:20] = bytes(4)
    if header.header_size < layouts.GptHeader.sizeof() or zlib.crc32(check) != header.header_crc32:
        raise FormatError("the guest's GPT header fails its CRC32", structure="GPT header", offset=lba * lss)
    return header


def read_partition_table(image: VhdxImage) -> PartitionTable:
    """The partitions of the guest disk (MBR, or GPT behind a protective MBR)."""
    lss = image.logical_sector_size
    mbr = image.read(0, 512)
    if mbr[510:512] != layouts.MBR_SIGNATURE:
        return PartitionTable("none", ())
    entries = [layouts.MbrPartitionEntry.parse(mbr[layouts.MBR_ENTRIES_OFFSET + 16 * i :]) for i in range(4)]
    if any(e.partition_type == layouts.MBR_PROTECTIVE_TYPE for e in entries):
        header = read_gpt_header(image, 1)
        if header is None:
            raise FormatError("a protective MBR but no GPT header at LBA 1", structure="GPT header", offset=lss)
        raw = image.read(header.partition_entry_lba * lss, _gpt_entries_bytes(header))
        parts = []
        for i in range(header.number_of_entries):
            entry = layouts.GptPartitionEntry.parse(raw[i * header.entry_size :])
            if entry.type_guid != bytes(16):
                parts.append(Partition(entry.first_lba * lss, (entry.last_lba + 1) * lss,
                                       str(uuid.UUID(bytes_le=bytes(entry.type_guid)))))
        room = ceil_div(_gpt_entries_bytes(header), lss) * lss + lss
        return PartitionTable("gpt", tuple(parts), room)
    # Extended partitions (type 5/0xF) contain their logical ones: their extent is enough for where data ends.
    parts = [Partition(e.first_lba * lss, (e.first_lba + e.sector_count) * lss, f"0x{e.partition_type:02x}")
             for e in entries
             if e.partition_type and e.sector_count]
    return PartitionTable("mbr", tuple(parts))


def _with_crc(header, **changes) -> bytes:
    fields = {k: v for k, v in dict(header).items() if not k.startswith("_")}
    fields.update(changes, header_crc32=0)
    raw = bytearray(layouts.GptHeader.build(fields))
    raw[16:20] = zlib.crc32(raw[: header.header_size]).to_bytes(4, "little")
    return bytes(raw)


def move_gpt_backup(image: VhdxImage) -> bool:
    """After a resize: write the backup GPT at the disk's end and point the primary header at it (writable image).

    Returns False when there is nothing to do (no GPT, or its backup is at the end already). The entries are copied
    from the primary array (their CRC is unchanged).
    """
    lss = image.logical_sector_size
    try:
        header = read_gpt_header(image, 1)
    except FormatError:
        return False
    last_lba = image.virtual_size // lss - 1
    if header is None or header.header_size != layouts.GptHeader.sizeof() or header.alternate_lba == last_lba:
        return False
    entries = image.read(header.partition_entry_lba * lss, _gpt_entries_bytes(header))
    entries_lba = last_lba - ceil_div(len(entries), lss)
    backup = _with_crc(header, my_lba=last_lba, alternate_lba=1, last_usable_lba=entries_lba - 1,
                       partition_entry_lba=entries_lba)
    primary = _with_crc(header, alternate_lba=last_lba, last_usable_lba=entries_lba - 1)
    image.write(entries_lba * lss, entries)
    image.write(last_lba * lss, backup.ljust(lss, b"\0"))
    image.flush()  # the backup exists before the primary names it
    image.write(lss, primary)
    image.flush()
    return True
