"""Metadata region: the table, the system items, and the parent locator, parsed into frozen data classes.

Each known item is declared once in ``ITEM_LAYOUTS`` (GUID -> layout and expected length). Unknown items
marked IsRequired make the file unopenable; other unknown items are kept (and reported by ``info``).

References: [MS-VHDX] §2.6.1 (table), §2.6.2 (items), §2.6.2.6 (parent locator).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import cast

from vhdx.errors import FormatError, VhdxError
from vhdx.findings import Code, Problem, Severity
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
# Flags (IsUser, IsVirtualDisk, IsRequired) the spec's table gives each system item (§2.6.2).
EXPECTED_ITEM_FLAGS = {
    c.FILE_PARAMETERS_GUID: c.META_IS_REQUIRED,
    c.VIRTUAL_DISK_SIZE_GUID: c.META_IS_REQUIRED | c.META_IS_VIRTUAL_DISK,
    c.VIRTUAL_DISK_ID_GUID: c.META_IS_REQUIRED | c.META_IS_VIRTUAL_DISK,
    c.LOGICAL_SECTOR_SIZE_GUID: c.META_IS_REQUIRED | c.META_IS_VIRTUAL_DISK,
    c.PHYSICAL_SECTOR_SIZE_GUID: c.META_IS_REQUIRED | c.META_IS_VIRTUAL_DISK,
    c.PARENT_LOCATOR_GUID: c.META_IS_REQUIRED,
}
ITEM_FLAG_BITS = c.META_IS_USER | c.META_IS_VIRTUAL_DISK | c.META_IS_REQUIRED


@dataclass(frozen=True)
class MetadataEntry:
    """One 32-byte entry of the metadata table (offset relative to the region)."""

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
    """The metadata region: its table entries, the parsed parameters and unknown entries."""

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


def _locator_error(message: str, offset: int, path: str | None) -> FormatError:
    return FormatError(message, structure="Parent Locator", offset=offset, path=path, code=Code.LOCATOR_MALFORMED)


def parse_parent_locator(raw: bytes, item_offset: int, path: str | None = None) -> ParentLocator:
    """Parse the parent locator item bytes (header, key/value entries, UTF-16LE strings); LOCATOR_MALFORMED if bad."""
    if len(raw) < c.LOCATOR_HEADER_SIZE:
        raise _locator_error(f"item is {len(raw)} bytes, shorter than its {c.LOCATOR_HEADER_SIZE}-byte header",
                             item_offset, path)
    head = parse_bytes(layouts.ParentLocatorHeader, raw[: c.LOCATOR_HEADER_SIZE], offset=item_offset,
                       structure="Parent Locator", path=path)
    if c.LOCATOR_HEADER_SIZE + c.LOCATOR_ENTRY_SIZE * head.key_value_count > len(raw):
        raise _locator_error(f"{head.key_value_count} key/value entries do not fit in {len(raw)} bytes",
                             item_offset, path)
    pairs = []
    for i in range(head.key_value_count):
        start = c.LOCATOR_HEADER_SIZE + c.LOCATOR_ENTRY_SIZE * i
        e = parse_bytes(layouts.ParentLocatorEntry, raw[start : start + c.LOCATOR_ENTRY_SIZE],
                        offset=item_offset + start, path=path)
        strings = []
        for what, off, length in (("key", e.key_offset, e.key_length), ("value", e.value_offset, e.value_length)):
            if length == 0 or off == 0 or off + length > len(raw) or length % 2:
                raise _locator_error(f"entry {i} {what} at {off:#x} length {length} is out of bounds or empty",
                                     item_offset + start, path)
            try:
                strings.append(raw[off : off + length].decode("utf-16-le"))
            except UnicodeDecodeError:
                raise _locator_error(f"entry {i} {what} is not valid UTF-16", item_offset + off, path) from None
        pairs.append((strings[0], strings[1]))
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _locator_error("duplicate key", item_offset, path)
    return ParentLocator(head.locator_type, tuple(pairs))


@dataclass
class MetadataScan:
    """What the metadata region holds and every rule it breaks (§2.6), as ``scan_metadata`` finds them.

    Attributes:
        entries: the table entries (empty when the table cannot be read).
        params: the disk parameters, None when a system item is missing, unreadable or illegal.
        locator: the parent locator of a differencing disk, when it parses.
        locator_entry: its table entry.
        problems: the broken rules, in the order check reports them.
    """

    entries: tuple[MetadataEntry, ...] = ()
    params: DiskParameters | None = None
    locator: ParentLocator | None = None
    locator_entry: MetadataEntry | None = None
    problems: list[Problem] = field(default_factory=list)

    def add(self, code: Code, structure: str, offset: int | None, message: str, severity=Severity.ERROR, *,
            repairable: bool = False, refuses_open: bool = True) -> None:
        self.problems.append(Problem(code, structure, offset, message, severity, repairable, refuses_open))

    @property
    def unknown_entries(self) -> tuple[MetadataEntry, ...]:
        return tuple(e for e in self.entries if e.is_user or e.item_id not in KNOWN_ITEMS)


def _table_entries(raw: bytes, region: RegionEntry, scan: MetadataScan) -> list[MetadataEntry] | None:
    count = int.from_bytes(raw[c.METADATA_ENTRY_COUNT_OFFSET : c.METADATA_ENTRY_COUNT_OFFSET + 2], "little")
    if count > c.METADATA_TABLE_MAX_ENTRIES:
        scan.add(Code.METADATA_ENTRY_COUNT, "Metadata Table", region.file_offset,
                 f"entry count {count} > {c.METADATA_TABLE_MAX_ENTRIES}")
        return None
    entries = []
    for i in range(count):
        start = c.METADATA_TABLE_HEADER_SIZE + i * c.METADATA_ENTRY_SIZE
        e = parse_bytes(layouts.MetadataTableEntry, raw[start : start + c.METADATA_ENTRY_SIZE],
                        offset=region.file_offset + start)
        entries.append(MetadataEntry(e.item_id, e.offset, e.length, e.flags, region.file_offset + start))
    if sum(e.is_user for e in entries) > c.METADATA_MAX_USER_ENTRIES:
        scan.add(Code.METADATA_ENTRY_COUNT, "Metadata Table", region.file_offset,
                 f"more than {c.METADATA_MAX_USER_ENTRIES} user items")
    return entries


def _entry_problems(entries: list[MetadataEntry], region: RegionEntry, scan: MetadataScan):
    """Bounds, duplicates, unknown required items and overlaps; returns (items in bounds, known system items)."""
    in_bounds: list[MetadataEntry] = []
    seen: set[tuple[uuid.UUID, bool]] = set()
    items: dict[uuid.UUID, MetadataEntry] = {}
    for e in entries:
        if e.length > c.METADATA_ITEM_MAX_LENGTH or (e.length and (
                e.offset < c.METADATA_TABLE_SIZE or e.offset + e.length > region.length)):
            scan.add(Code.METADATA_ITEM_BOUNDS, "Metadata Table Entry", e.table_offset,
                     f"{e.name} at region offset {e.offset:#x} length {e.length} lies outside the item area")
        elif e.length:
            in_bounds.append(e)
        key = (e.item_id, e.is_user)
        if key in seen:
            scan.add(Code.METADATA_ITEM_DUPLICATE, "Metadata Table Entry", e.table_offset,
                     f"{e.name} appears more than once")
        seen.add(key)
        if e.item_id in KNOWN_ITEMS and not e.is_user:
            items.setdefault(e.item_id, e)
        elif e.is_required:
            scan.add(Code.METADATA_UNKNOWN_REQUIRED, "Metadata Table Entry", e.table_offset,
                     f"unknown metadata item {e.item_id} is marked required")
    in_bounds.sort(key=lambda e: e.offset)
    for a, b in zip(in_bounds, in_bounds[1:], strict=False):
        if b.offset < a.offset + a.length:
            # The reader reads each item on its own: an overlap is reported, it does not stop reads.
            scan.add(Code.METADATA_ITEM_OVERLAP, "Metadata Table Entry", b.table_offset,
                     f"{b.name} overlaps {a.name}", refuses_open=False)
    for guid, e in items.items():
        if e.flags & ITEM_FLAG_BITS != EXPECTED_ITEM_FLAGS[guid]:
            scan.add(Code.METADATA_FLAGS, KNOWN_ITEMS[guid], e.table_offset,
                     f"flags {e.flags:#x}, the spec gives {EXPECTED_ITEM_FLAGS[guid]:#x}", Severity.WARNING,
                     repairable=True, refuses_open=False)
    return in_bounds, items


def _read_item(read_at, region: RegionEntry, e: MetadataEntry, scan: MetadataScan, name: str, layout):
    where = region.file_offset + e.offset
    raw = read_at(where, e.length)
    if len(raw) < e.length:
        scan.add(Code.FILE_TRUNCATED, name, where, f"the file ends inside the item ({len(raw)} of {e.length} bytes)")
        return None
    return raw if layout is None else parse_bytes(layout, raw, offset=where, structure=name)


def scan_metadata(read_at, region: RegionEntry, path: str | None = None) -> MetadataScan:
    """Read the metadata table, the system items and the parent locator, and judge them (§2.6).

    Args:
        read_at: ``(offset, length) -> bytes`` of the file (as the reader sees it; may return less at the end).
        region: the metadata region.
        path: the file, for error messages.
    """
    scan = MetadataScan()
    raw = read_at(region.file_offset, c.METADATA_TABLE_SIZE)
    if len(raw) < c.METADATA_TABLE_SIZE:
        scan.add(Code.FILE_TRUNCATED, "Metadata Table", region.file_offset, "the file ends inside the metadata table")
        return scan
    table_ok = raw[: len(c.METADATA_SIGNATURE)] == c.METADATA_SIGNATURE
    entries = _table_entries(raw, region, scan)
    if entries is None:
        return scan
    scan.entries = tuple(entries)
    in_bounds, items = _entry_problems(entries, region, scan)
    values, usable = {}, True
    for guid, (name, layout, size) in ITEM_LAYOUTS.items():
        e = items.get(guid)
        if e is None:
            scan.add(Code.METADATA_ITEM_MISSING, "Metadata Table", region.file_offset,
                     f"required item {name} is missing")
            usable = False
        elif e.length != size:
            scan.add(Code.METADATA_ITEM_LENGTH, name, e.table_offset, f"length {e.length}, expected {size}")
            usable = False
        elif e not in in_bounds:
            usable = False
        else:
            values[guid] = _read_item(read_at, region, e, scan, name, layout)
            usable = usable and values[guid] is not None
    params = _parameters(values) if usable else None
    problems = parameter_problems(params.block_size, params.logical_sector_size, params.physical_sector_size,
                                  params.virtual_size) if params else []
    if not table_ok:
        intact = usable and not problems
        scan.add(Code.METADATA_SIGNATURE, "Metadata Table", region.file_offset,
                 f"signature {raw[:8]!r} instead of 'metadata'" + ("; every system item is intact" if intact else ""),
                 repairable=intact)
    if problems:
        scan.add(Code.METADATA_VALUE, "Metadata", region.file_offset, "; ".join(problems))
    if params is None or problems:
        return scan
    _scan_locator(read_at, region, items.get(c.PARENT_LOCATOR_GUID), params, in_bounds, scan, path)
    scan.params = params if scan.locator is None else _with_locator(params, scan.locator)
    return scan


def _parameters(values: dict) -> DiskParameters:
    fp = values[c.FILE_PARAMETERS_GUID]
    return DiskParameters(
        block_size=fp.block_size,
        leave_block_allocated=bool(fp.flags & c.FILE_PARAM_LEAVE_BLOCK_ALLOCATED),
        has_parent=bool(fp.flags & c.FILE_PARAM_HAS_PARENT),
        virtual_size=values[c.VIRTUAL_DISK_SIZE_GUID].virtual_disk_size,
        virtual_disk_id=values[c.VIRTUAL_DISK_ID_GUID].virtual_disk_id,
        logical_sector_size=values[c.LOGICAL_SECTOR_SIZE_GUID].logical_sector_size,
        physical_sector_size=values[c.PHYSICAL_SECTOR_SIZE_GUID].physical_sector_size,
        file_parameter_flags=fp.flags,
    )


def _with_locator(params: DiskParameters, locator: ParentLocator) -> DiskParameters:
    return replace(params, parent_locator=locator)


def _scan_locator(read_at, region: RegionEntry, entry: MetadataEntry | None, params: DiskParameters, in_bounds,
                  scan: MetadataScan, path: str | None) -> None:
    """Parent locator rules (§2.6.2.6): present and well formed in a differencing disk, of the VHDX type."""
    scan.locator_entry = entry
    if entry is None:
        if params.has_parent:
            scan.add(Code.LOCATOR_MISSING, "Metadata Table", region.file_offset,
                     "a differencing disk without a Parent Locator item")
        return
    where = region.file_offset + entry.offset
    if entry.length == 0 or entry not in in_bounds:
        if params.has_parent:
            scan.add(Code.LOCATOR_MALFORMED, "Parent Locator", entry.table_offset,
                     f"the parent locator item is empty or out of bounds (length {entry.length})")
        return
    raw = _read_item(read_at, region, entry, scan, "Parent Locator", None)
    if raw is None:
        return
    try:
        locator = parse_parent_locator(raw, where, path)
    except VhdxError as exc:
        scan.add(Code.LOCATOR_MALFORMED, "Parent Locator", exc.offset, exc.message)
        return
    if not params.has_parent:
        scan.locator = locator
        return
    if locator.locator_type != c.VHDX_PARENT_LOCATOR_TYPE_GUID:
        scan.add(Code.LOCATOR_TYPE, "Parent Locator", where, f"locator type {locator.locator_type} is not the VHDX one")
        return
    if locator.get(c.PARENT_LINKAGE_KEY) is None or not locator.paths:
        # The reader can still read this file's own blocks; resolving the parent fails later (PARENT_NOT_FOUND).
        missing = "parent_linkage" if locator.get(c.PARENT_LINKAGE_KEY) is None else "every parent path"
        scan.add(Code.LOCATOR_KEYS, "Parent Locator", where, f"{missing} is missing", refuses_open=False)
    scan.locator = locator


# The table and the items that follow it are read with one pread: writers put the items in the first KiB after the
# table (one farther away is read on its own). Not more: every open of every layer copies these bytes twice.
METADATA_READ_AHEAD = c.METADATA_TABLE_SIZE + 4096


def _read_ahead(io: ImageIO, region: RegionEntry):
    """A ``read_at`` that serves the start of the metadata region from one read, and the rest from the file."""
    start = region.file_offset
    head = io.read_at(start, max(0, min(region.length, METADATA_READ_AHEAD, io.size - start)))

    def read_at(offset: int, length: int) -> bytes:
        if start <= offset and offset + length <= start + len(head):
            return head[offset - start : offset - start + length]
        return io.read_at(offset, length)

    return read_at


def load_metadata(io: ImageIO, region: RegionEntry) -> Metadata:
    """Read the metadata table and every system item; raise the first rule the reader depends on."""
    scan = scan_metadata(_read_ahead(io, region), region, io.path)
    problem = next((p for p in scan.problems if p.refuses_open), None)
    if problem is not None:
        raise FormatError.from_problem(problem, io.path)
    return Metadata(region, scan.entries, cast(DiskParameters, scan.params), scan.unknown_entries)  # no refusal: set


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
