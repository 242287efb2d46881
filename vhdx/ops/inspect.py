"""Plain descriptions of images (data classes that serialise to JSON) for ``info``; chains: ``vhdx.ops.chain_info``.

``DiskInfo`` is the common schema: the Hyper-V backend maps Get-VHD output onto the same fields, so a disk
read by Hyper-V and by this library can be compared field by field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from vhdx.disk.extents import ExtentKind
from vhdx.disk.image import VhdxImage
from vhdx.errors import VhdxError
from vhdx.format import constants as c


@dataclass
class DiskInfo:
    """Fields every description of a disk has, whoever read it (this library or Hyper-V's Get-VHD)."""

    path: str
    format: str
    disk_type: str
    virtual_size: int
    file_size: int
    block_size: int
    logical_sector_size: int
    physical_sector_size: int
    disk_id: str
    parent_path: str | None


@dataclass
class HeaderInfo:
    """One header copy as ``info`` shows it (the fields after ``current`` only when it parses)."""

    slot: int
    offset: int
    valid: bool
    problem: str | None
    current: bool
    sequence_number: int | None = None
    file_write_guid: str | None = None
    data_write_guid: str | None = None
    log_guid: str | None = None
    log_offset: int | None = None
    log_length: int | None = None
    version: int | None = None
    log_version: int | None = None
    checksum: int | None = None


@dataclass
class ImageInfo(DiskInfo):
    """Everything ``vhdx info`` shows."""

    creator: str = ""
    leave_block_allocated: bool = False
    has_parent: bool = False
    allocated_bytes: int = 0
    data_write_guid: str = ""
    file_write_guid: str = ""
    headers: list[HeaderInfo] = field(default_factory=list)
    region_tables: list[dict] = field(default_factory=list)
    regions: list[dict] = field(default_factory=list)
    metadata_items: list[dict] = field(default_factory=list)
    bat: dict = field(default_factory=dict)
    log: dict = field(default_factory=dict)
    parent_locator: dict | None = None
    writer_active: bool = False
    parent_status: dict | None = None  # differencing disks: how the parent resolves, or what the file holds alone

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _header_info(copy, current_index: int) -> HeaderInfo:
    info = HeaderInfo(copy.index + 1, copy.offset, copy.valid, copy.problem, copy.index == current_index)
    h = copy.header
    if h is not None:
        info.sequence_number = h.sequence_number
        info.file_write_guid = str(h.file_write_guid)
        info.data_write_guid = str(h.data_write_guid)
        info.log_guid = str(h.log_guid)
        info.log_offset = h.log_offset
        info.log_length = h.log_length
        info.version = h.version
        info.log_version = h.log_version
        info.checksum = h.checksum
    return info


def describe_image(image: VhdxImage) -> ImageInfo:
    """Describe one file (does not open its parent)."""
    p = image.params
    g = image.geometry
    locator = p.parent_locator
    log = image.log
    return ImageInfo(
        path=image.path,
        format="vhdx",
        disk_type=image.disk_type.label,
        virtual_size=image.virtual_size,
        file_size=image.io.real_size,
        block_size=image.block_size,
        logical_sector_size=image.logical_sector_size,
        physical_sector_size=image.physical_sector_size,
        disk_id=str(image.disk_id),
        parent_path=parent_path_hint(image),
        creator=image.creator,
        leave_block_allocated=p.leave_block_allocated,
        has_parent=p.has_parent,
        allocated_bytes=image.allocated_bytes,
        data_write_guid=str(image.data_write_guid),
        file_write_guid=str(image.file_write_guid),
        headers=[_header_info(copy, image.headers.current_index) for copy in image.headers.copies],
        region_tables=[{"slot": t.index + 1, "offset": t.offset, "valid": t.valid, "problem": t.problem,
                        "used": t.index == image.regions.used_index} for t in image.regions.copies],
        regions=[{"guid": str(e.guid), "name": e.name, "file_offset": e.file_offset, "length": e.length,
                  "required": e.required} for e in image.regions.entries],
        metadata_items=[{"item_id": str(e.item_id), "name": e.name, "offset": e.offset, "length": e.length,
                         "is_user": e.is_user, "is_virtual_disk": e.is_virtual_disk, "is_required": e.is_required}
                        for e in image.metadata.entries],
        bat={"file_offset": image.bat.file_offset, "entries": g.bat_entries, "payload_blocks": g.data_blocks,
             "sector_bitmap_blocks": g.sector_bitmap_blocks, "chunk_ratio": g.chunk_ratio,
             "state_counts": image.bat.state_counts(),
             "sector_bitmaps_present": image.bat.summary.bitmaps_present},
        log={"offset": log.log_offset, "length": log.log_length, "guid": str(log.log_guid), "dirty": log.is_dirty,
             "entries_to_replay": len(log.sequence), "replayed_in_memory": log.needs_replay and not image.writable,
             "problem": log.problem},
        parent_locator=None if locator is None else {
            "type": str(locator.locator_type), "entries": dict(locator.entries)},
        writer_active=image.io.writer_lock_held() if not image.writable else False,
    )


def describe_parent(image: VhdxImage) -> dict | None:
    """How a differencing disk's parent resolves; for orphan opens, what the file holds on its own."""
    if not image.has_parent:
        return None
    if image.options.orphan:
        ext = image.extents(through_parents=False)
        absent = int(ext.length[ext.kind == ExtentKind.ABSENT].sum())
        return {"orphan": True, "held_bytes": image.virtual_size - absent, "absent_bytes": absent}
    try:
        parent = image.parent
    except VhdxError as exc:
        return {"found": False, "error": str(exc)}
    return {"found": True, "path": os.path.abspath(parent.path), "found_by": image.parent_source,
            "linkage_ok": parent.data_write_guid in image.params.parent_locator.linkages}


def parent_path_hint(image: VhdxImage) -> str | None:
    """The parent path as the locator states it (not resolved): relative path first, as Get-VHD shows."""
    locator = image.params.parent_locator
    if locator is None:
        return None
    paths = dict(locator.paths)
    return paths.get(c.ABSOLUTE_WIN32_PATH_KEY) or paths.get(c.RELATIVE_PATH_KEY) or paths.get(c.VOLUME_PATH_KEY)


# ``chain``'s descriptions live in vhdx.ops.chain_info (``info`` need not build their data classes at start-up);
# the names stay reachable here.
_CHAIN_NAMES = ("LayerInfo", "ChainInfo", "describe_chain")


def __getattr__(name: str) -> object:
    if name in _CHAIN_NAMES:
        from vhdx.ops import chain_info  # noqa: PLC0415 - chain only (start-up cost of info)

        return getattr(chain_info, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
