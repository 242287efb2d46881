"""Metadata region: the table, the system items, and the parent locator, parsed into frozen data classes.

Each known item is declared once in ``ITEM_LAYOUTS`` (GUID -> layout and expected length). Unknown items
marked IsRequired make the file unopenable; other unknown items are kept (and reported by ``info``).

References: [MS-VHDX] §2.6.1 (table), §2.6.2 (items), §2.6.2.6 (parent locator).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from vhdx.errors import FormatError, UnsupportedError
from vhdx.format import constants as c
from vhdx.format import layouts
from vhdx.format.guid import parse_guid_text
from vhdx.io import ImageIO, parse_bytes
from vhdx.structures.region import RegionEntry

# GUID -> (item name, layout, exact length). The parent locator is variable-sized and parsed on its own.
ITEM_LAYOUTS = {
    c.FILE_PARAMETERS_GUID: ("File Parameters", layouts.FileParameters, 8),
    c.VIRTUAL_DISK_SIZE_GUID: ("Virtual Disk Size", layouts.VirtualDiskSize, 8),
    c.VIRTUAL_DISK_ID_GUID: ("Virtual Disk ID", layouts.VirtualDiskId, 16),
    c.LOGICAL_SECTOR_SIZE_GUID: ("Logical Sector Size", layouts.LogicalSectorSize, 4),
    c.PHYSICAL_SECTOR_SIZE_GUID: ("Physical Sector Size", layouts.PhysicalSectorSize, 4),
}
KNOWN_ITEMS = {**{guid: spec[0] for guid, spec in ITEM_LAYOUTS.items()}, c.PARENT_LOCATOR_GUID: "Parent Locator"}


@dataclass(frozen=True)
class MetadataEntry:
    item_id: uuid.UUID
    offset: int  # from the start of the metadata region
    length: int
    flags: int
    table_offset: int  # file offset of this 32-byte table entry

    @property
    def is_user(self) -> bool:
        return bool(self.flags & c.META_IS_USER)

    @property
    def is_virtual_disk(self) -> bool:
        return bool(self.flags & c.META_IS_VIRTUAL_DISK)

    @property
    def is_required(self) -> bool:
        return bool(self.flags & c.META_IS_REQUIRED)

    @property
    def name(self) -> str:
        return KNOWN_ITEMS.get(self.item_id, str(self.item_id)) if not self.is_user else f"user item {self.item_id}"


@dataclass(frozen=True)
class ParentLocator:
    """The parent locator item: its type GUID and its key/value pairs in file order."""

    locator_type: uuid.UUID
    entries: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str | None:
        return next((value for k, value in self.entries if k == key), None)

    @property
    def linkages(self) -> tuple[uuid.UUID, ...]:
        """The parent DataWriteGuid values this child accepts (parent_linkage, then parent_linkage2)."""
        found = []
        for key in (c.PARENT_LINKAGE_KEY, c.PARENT_LINKAGE2_KEY):
            text = self.get(key)
            guid = parse_guid_text(text) if text else None
            if guid is not None and guid != c.ZERO_GUID:
                found.append(guid)
        return tuple(found)

    @property
    def paths(self) -> tuple[tuple[str, str], ...]:
        """(key, path) for the locator paths present, in the order the spec says to try them."""
        return tuple((key, value) for key in c.PARENT_PATH_KEYS if (value := self.get(key)))


@dataclass(frozen=True)
class DiskParameters:
    """The system metadata items of one file."""

    block_size: int
    leave_block_allocated: bool
    has_parent: bool
    virtual_size: int
    virtual_disk_id: uuid.UUID
    logical_sector_size: int
    physical_sector_size: int
    parent_locator: ParentLocator | None = None
    file_parameter_flags: int = 0

    @property
    def disk_type(self) -> c.DiskType:
        if self.has_parent:
            return c.DiskType.DIFFERENCING
        return c.DiskType.FIXED if self.leave_block_allocated else c.DiskType.DYNAMIC


@dataclass(frozen=True)
class Metadata:
    region: RegionEntry
    entries: tuple[MetadataEntry, ...]
    params: DiskParameters
    unknown_entries: tuple[MetadataEntry, ...] = field(default=())


def parameter_problems(block_size: int, logical: int, physical: int, virtual_size: int) -> list[str]:
    """Rules of §2.6.2 on the geometry values (empty list = legal)."""
    problems = []
    if block_size < c.MIN_BLOCK_SIZE or block_size > c.MAX_BLOCK_SIZE or block_size & (block_size - 1):
        problems.append(f"block size {block_size} is not a power of two between 1 MiB and 256 MiB")
    if logical not in c.SECTOR_SIZES:
        problems.append(f"logical sector size {logical} is not 512 or 4096")
    if physical not in c.SECTOR_SIZES:
        problems.append(f"physical sector size {physical} is not 512 or 4096")
    if virtual_size > c.MAX_VIRTUAL_SIZE:
        problems.append(f"virtual size {virtual_size} exceeds 64 TiB")
    if logical in c.SECTOR_SIZES and virtual_size % logical:
        problems.append(f"virtual size {virtual_size} is not a multiple of the logical sector size {logical}")
    return problems


def parse_table(raw: bytes, region: RegionEntry, path: str | None = None) -> tuple[MetadataEntry, ...]:
    """Parse the 64 KiB metadata table and check each entry's bounds inside the region."""
    head = parse_bytes(layouts.MetadataTableHeader, raw[:32], offset=region.file_offset, path=path)
    if head.entry_count > c.METADATA_TABLE_MAX_ENTRIES:
        raise FormatError(
            f"entry count {head.entry_count} > {c.METADATA_TABLE_MAX_ENTRIES}",
            structure="Metadata Table Header",
            offset=region.file_offset,
            path=path,
        )
    entries = []
    for i in range(head.entry_count):
        start = 32 + i * c.METADATA_ENTRY_SIZE
        where = region.file_offset + start
        e = parse_bytes(layouts.MetadataTableEntry, raw[start : start + 32], offset=where, path=path)
        entry = MetadataEntry(e.item_id, e.offset, e.length, e.flags, where)
        if entry.length > c.METADATA_ITEM_MAX_LENGTH:
            raise FormatError(f"{entry.name} length {entry.length} > 1 MiB", structure="Metadata Table Entry",
                              offset=where, path=path)
        if entry.length and (entry.offset < c.METADATA_TABLE_SIZE or entry.offset + entry.length > region.length):
            raise FormatError(
                f"{entry.name} at region offset {entry.offset:#x} length {entry.length} lies outside the item area",
                structure="Metadata Table Entry",
                offset=where,
                path=path,
            )
        entries.append(entry)
    keys = [(e.item_id, e.is_user) for e in entries]
    if len(set(keys)) != len(keys):
        raise FormatError("an item appears more than once", structure="Metadata Table", offset=region.file_offset,
                          path=path)
    if sum(e.is_user for e in entries) > c.METADATA_MAX_USER_ENTRIES:
        raise FormatError("more than 1024 user items", structure="Metadata Table", offset=region.file_offset,
                          path=path)
    return tuple(entries)


def parse_parent_locator(raw: bytes, item_offset: int, path: str | None = None) -> ParentLocator:
    """Parse the parent locator item bytes (header, key/value entries, UTF-16LE strings)."""
    name = "Parent Locator"
    if len(raw) < 20:
        raise FormatError(f"item is {len(raw)} bytes, shorter than its 20-byte header", structure=name,
                          offset=item_offset, path=path)
    head = parse_bytes(layouts.ParentLocatorHeader, raw[:20], offset=item_offset, structure=name, path=path)
    if 20 + 12 * head.key_value_count > len(raw):
        raise FormatError(f"{head.key_value_count} key/value entries do not fit in {len(raw)} bytes",
                          structure=name, offset=item_offset, path=path)
    pairs = []
    for i in range(head.key_value_count):
        start = 20 + 12 * i
        e = parse_bytes(layouts.ParentLocatorEntry, raw[start : start + 12], offset=item_offset + start, path=path)
        strings = []
        for what, off, length in (("key", e.key_offset, e.key_length), ("value", e.value_offset, e.value_length)):
            if length == 0 or off == 0 or off + length > len(raw) or length % 2:
                raise FormatError(f"entry {i} {what} at {off:#x} length {length} is out of bounds or empty",
                                  structure=name, offset=item_offset + start, path=path)
            try:
                strings.append(raw[off : off + length].decode("utf-16-le"))
            except UnicodeDecodeError:
                raise FormatError(f"entry {i} {what} is not valid UTF-16", structure=name,
                                  offset=item_offset + off, path=path) from None
        pairs.append((strings[0], strings[1]))
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise FormatError("duplicate key", structure=name, offset=item_offset, path=path)
    return ParentLocator(head.locator_type, tuple(pairs))


# Known items that lie this close together are read with one pread (they usually share a few KiB).
ITEMS_SPAN_MAX = 1 << 20


def _items_buffer(io: ImageIO, region: RegionEntry, entries) -> tuple[int, bytes] | None:
    """(region offset, bytes) covering every known item, read at once.

    None when the items lie far apart or the file ends before them: then each item is read, and reported, alone.
    """
    spans = [(e.offset, e.offset + e.length) for e in entries if e.length]
    if not spans:
        return None
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if hi - lo > ITEMS_SPAN_MAX or region.file_offset + hi > io.size:
        return None
    return lo, io.read_at(region.file_offset + lo, hi - lo)


def load_metadata(io: ImageIO, region: RegionEntry) -> Metadata:
    """Read the metadata table and every system item; validate what the reader depends on."""
    if region.length < c.METADATA_TABLE_SIZE:
        raise FormatError(f"metadata region length {region.length} is smaller than its 64 KiB table",
                          structure="Metadata region", offset=region.file_offset, path=io.path)
    raw_table = io.read_exact_at(region.file_offset, c.METADATA_TABLE_SIZE, "Metadata Table")
    entries = parse_table(raw_table, region, io.path)
    items: dict[uuid.UUID, MetadataEntry] = {}
    unknown = []
    for entry in entries:
        if entry.item_id in KNOWN_ITEMS and not entry.is_user:
            items[entry.item_id] = entry
        else:
            if entry.is_required:
                raise UnsupportedError(f"unknown required metadata item {entry.item_id}",
                                       structure="Metadata Table Entry", offset=entry.table_offset, path=io.path)
            unknown.append(entry)
    values = {}
    items_raw = _items_buffer(io, region, items.values())
    for guid, (name, layout, size) in ITEM_LAYOUTS.items():
        item = items.get(guid)
        if item is None:
            raise FormatError(f"required item {name} is missing", structure="Metadata Table",
                              offset=region.file_offset, path=io.path)
        where = region.file_offset + item.offset
        if item.length != size:
            raise FormatError(f"length {item.length}, expected {size}", structure=name, offset=where, path=io.path)
        if items_raw is None:
            values[guid] = io.read_layout(layout, where, name)
        else:
            lo = item.offset - items_raw[0]
            values[guid] = parse_bytes(layout, items_raw[1][lo : lo + size], offset=where, structure=name,
                                       path=io.path)
    file_params = values[c.FILE_PARAMETERS_GUID]
    has_parent = bool(file_params.flags & c.FILE_PARAM_HAS_PARENT)
    locator = None
    locator_entry = items.get(c.PARENT_LOCATOR_GUID)
    if has_parent and (locator_entry is None or locator_entry.length == 0):
        raise FormatError("differencing disk without a Parent Locator item (or an empty one)",
                          structure="Metadata Table", offset=region.file_offset, path=io.path)
    if locator_entry is not None and locator_entry.length:
        where = region.file_offset + locator_entry.offset
        if items_raw is None:
            raw = io.read_exact_at(where, locator_entry.length, "Parent Locator")
        else:
            lo = locator_entry.offset - items_raw[0]
            raw = items_raw[1][lo : lo + locator_entry.length]
        locator = parse_parent_locator(raw, where, io.path)
    params = DiskParameters(
        block_size=file_params.block_size,
        leave_block_allocated=bool(file_params.flags & c.FILE_PARAM_LEAVE_BLOCK_ALLOCATED),
        has_parent=has_parent,
        virtual_size=values[c.VIRTUAL_DISK_SIZE_GUID].virtual_disk_size,
        virtual_disk_id=values[c.VIRTUAL_DISK_ID_GUID].virtual_disk_id,
        logical_sector_size=values[c.LOGICAL_SECTOR_SIZE_GUID].logical_sector_size,
        physical_sector_size=values[c.PHYSICAL_SECTOR_SIZE_GUID].physical_sector_size,
        parent_locator=locator,
        file_parameter_flags=file_params.flags,
    )
    problems = parameter_problems(params.block_size, params.logical_sector_size, params.physical_sector_size,
                                  params.virtual_size)
    if problems:
        raise FormatError("; ".join(problems), structure="Metadata", offset=region.file_offset, path=io.path)
    if locator is not None and locator_entry is not None and has_parent \
            and locator.locator_type != c.VHDX_PARENT_LOCATOR_TYPE_GUID:
        raise UnsupportedError(f"unknown parent locator type {locator.locator_type}", structure="Parent Locator",
                               offset=region.file_offset + locator_entry.offset, path=io.path)
    return Metadata(region, entries, params, tuple(unknown))


# --- building (create, set-parent, merge) -----------------------------------------------------------
@dataclass(frozen=True)
class MetadataItem:
    """An item to lay out in a metadata region: its table flags and its bytes."""

    item_id: uuid.UUID
    flags: int
    data: bytes


def build_parent_locator(entries: list[tuple[str, str]]) -> bytes:
    """Parent locator item bytes: header, key/value entries, then the UTF-16LE strings."""
    strings_at = 20 + 12 * len(entries)
    table, blob = [], b""
    for key, value in entries:
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        key_off = strings_at + len(blob)
        blob += k
        value_off = strings_at + len(blob)
        blob += v
        table.append(layouts.ParentLocatorEntry.build(
            {"key_offset": key_off, "value_offset": value_off, "key_length": len(k), "value_length": len(v)}))
    head = layouts.ParentLocatorHeader.build(
        {"locator_type": c.VHDX_PARENT_LOCATOR_TYPE_GUID, "reserved": 0, "key_value_count": len(entries)})
    return head + b"".join(table) + blob


def system_items(params: DiskParameters, locator_entries: list[tuple[str, str]] | None = None) -> list[MetadataItem]:
    """The system items of a disk with the flags the spec's table gives them."""
    required, vdisk = c.META_IS_REQUIRED, c.META_IS_REQUIRED | c.META_IS_VIRTUAL_DISK
    flags = (c.FILE_PARAM_LEAVE_BLOCK_ALLOCATED if params.leave_block_allocated else 0) | (
        c.FILE_PARAM_HAS_PARENT if params.has_parent else 0)
    items = [
        MetadataItem(c.FILE_PARAMETERS_GUID, required,
                     layouts.FileParameters.build({"block_size": params.block_size, "flags": flags})),
        MetadataItem(c.VIRTUAL_DISK_SIZE_GUID, vdisk,
                     layouts.VirtualDiskSize.build({"virtual_disk_size": params.virtual_size})),
        MetadataItem(c.VIRTUAL_DISK_ID_GUID, vdisk,
                     layouts.VirtualDiskId.build({"virtual_disk_id": params.virtual_disk_id})),
        MetadataItem(c.LOGICAL_SECTOR_SIZE_GUID, vdisk,
                     layouts.LogicalSectorSize.build({"logical_sector_size": params.logical_sector_size})),
        MetadataItem(c.PHYSICAL_SECTOR_SIZE_GUID, vdisk,
                     layouts.PhysicalSectorSize.build({"physical_sector_size": params.physical_sector_size})),
    ]
    if locator_entries is not None:
        items.append(MetadataItem(c.PARENT_LOCATOR_GUID, required, build_parent_locator(locator_entries)))
    return items


def layout_metadata_region(items: list[MetadataItem], region_length: int) -> bytes:
    """Table plus items laid end to end after the 64 KiB table; the result is ``region_length`` bytes."""
    table = bytearray(c.METADATA_TABLE_SIZE)
    table[:32] = layouts.MetadataTableHeader.build({"reserved": 0, "entry_count": len(items), "reserved2": bytes(20)})
    body = bytearray()
    for i, item in enumerate(items):
        offset = c.METADATA_TABLE_SIZE + len(body) if item.data else 0
        entry = layouts.MetadataTableEntry.build(
            {"item_id": item.item_id, "offset": offset, "length": len(item.data), "flags": item.flags,
             "reserved2": 0})
        table[32 + 32 * i : 64 + 32 * i] = entry
        body += item.data
    total = c.METADATA_TABLE_SIZE + len(body)
    if total > region_length:
        raise FormatError(f"metadata items need {total} bytes but the region holds {region_length}",
                          structure="Metadata region")
    return bytes(table + body + bytes(region_length - total))


def read_items(io: ImageIO, metadata: Metadata) -> list[MetadataItem]:
    """Every item of a file with its bytes, in table order (to rewrite a region preserving unknown items)."""
    items = []
    for entry in metadata.entries:
        data = io.read_at(metadata.region.file_offset + entry.offset, entry.length) if entry.length else b""
        items.append(MetadataItem(entry.item_id, entry.flags, data))
    return items
