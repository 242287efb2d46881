"""Creating fixed, dynamic and differencing VHDX files laid out as Hyper-V does.

Layout: header section (1 MiB), log at 1 MiB, metadata region after it (1 MiB), BAT after that (rounded up
to 1 MiB), then payload blocks, every object 1 MiB aligned. Every check runs before the file is created;
the file is built as an exclusive temporary and renamed into place (``vhdx.ops.output``), so a failed create
leaves nothing behind.

References: [MS-VHDX] §2.2 (header section), §2.5 (BAT), §2.6 (metadata), §2.6.2.6 (parent locator);
Hyper-V defaults: 32 MiB blocks for dynamic/fixed disks, 2 MiB for checkpoints (.avhdx), 4 KiB physical sectors.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import uuid
from dataclasses import dataclass, field

from vhdx.disk.image import open_image
from vhdx.errors import InvalidRequestError, VhdxError
from vhdx.format import constants as c
from vhdx.format import layouts
from vhdx.format.guid import format_guid_text
from vhdx.lazy import np
from vhdx.ops import output
from vhdx.structures.bat import BAT_DTYPE, WINDOW_ENTRIES, Geometry, ceil_div
from vhdx.structures.header import Header
from vhdx.structures.metadata import DiskParameters, layout_metadata_region, parameter_problems, system_items
from vhdx.structures.region import RegionEntry, build_region_table

DEFAULT_CREATOR = "vhdx-chain"
DIFFERENCING_BLOCK_SIZE = 2 * c.MiB
DISK_TYPES = ("dynamic", "fixed", "differencing")


@dataclass(frozen=True)
class CreateIds:
    """GUIDs of a new file; fixed values make the output reproducible (fixture builder)."""

    file_write_guid: uuid.UUID = field(default_factory=uuid.uuid4)
    data_write_guid: uuid.UUID = field(default_factory=uuid.uuid4)
    disk_id: uuid.UUID | None = None  # None: random for a base disk, the parent's for a child


def align_up(value: int, alignment: int = c.ALIGNMENT) -> int:
    return ceil_div(value, alignment) * alignment


def running_under_wsl() -> bool:
    """Windows Subsystem for Linux, where /mnt/<letter>/ is that Windows drive."""
    return "microsoft" in platform.release().lower() or "WSL_DISTRO_NAME" in os.environ


def windows_absolute_path(abs_path: str, *, windows: bool, wsl: bool) -> str | None:
    """The Windows form (drive letter or UNC) of an absolute path, or None when it has none we know.

    A POSIX path is never returned: Hyper-V and other readers would take it for a Windows path.
    """
    if windows:
        return abs_path
    m = re.fullmatch(r"/mnt/([a-zA-Z])(/.*)?", abs_path)
    if wsl and m:
        return f"{m.group(1).upper()}:" + (m.group(2) or "/").replace("/", "\\")
    return None


def locator_paths(child_path: str, parent_path: str) -> list[tuple[str, str]]:
    """relative_path, and absolute_win32_path when the parent has a Windows path, as Hyper-V writes them."""
    child_dir = os.path.dirname(os.path.abspath(child_path))
    parent_abs = os.path.abspath(parent_path)
    for path in (child_dir, parent_abs):
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            # The locator holds UTF-16 text; bytes that are not UTF-8 have no faithful spelling there.
            raw = os.fsencode(path)
            raise InvalidRequestError(f"the path {raw!r} is not valid UTF-8 and cannot be stored in a parent "
                                      "locator; rename the file or folder") from None
    rel = os.path.relpath(parent_abs, child_dir).replace(os.sep, "\\")
    if not rel.startswith(".."):
        rel = ".\\" + rel
    entries = [(c.RELATIVE_PATH_KEY, rel)]
    absolute = windows_absolute_path(parent_abs, windows=sys.platform == "win32", wsl=running_under_wsl())
    if absolute is not None:
        entries.append((c.ABSOLUTE_WIN32_PATH_KEY, absolute))
    return entries


def parent_locator_entries(child_path: str, parent_path: str, parent_data_write_guid: uuid.UUID
                           ) -> list[tuple[str, str]]:
    return [(c.PARENT_LINKAGE_KEY, format_guid_text(parent_data_write_guid)), *locator_paths(child_path, parent_path)]


def validate_request(size: int, block_size: int, logical: int, physical: int) -> None:
    if size <= 0:
        raise InvalidRequestError(f"size must be positive (got {size})")
    problems = parameter_problems(block_size, logical, physical, size)
    if problems:
        raise InvalidRequestError("; ".join(problems))


def create(
    path: str | os.PathLike,
    size: int | None = None,
    *,
    type: str = "dynamic",  # the name users know from New-VHD / qemu-img
    block_size: int | None = None,
    logical_sector_size: int | None = None,
    physical_sector_size: int | None = None,
    parent: str | os.PathLike | None = None,
    overwrite: bool = False,
    creator: str = DEFAULT_CREATOR,
    ids: CreateIds | None = None,
    log_size: int = c.DEFAULT_LOG_SIZE,
    parent_search_dirs=(),
) -> str:
    """Create a VHDX file and return its path.

    Args:
        path: file to create (``.avhdx`` is fine for differencing disks).
        size: virtual size in bytes; a differencing disk takes its parent's when None.
        type: "dynamic", "fixed" or "differencing" (implied when ``parent`` is given).
        block_size: payload block size; 32 MiB by default (2 MiB for differencing disks, as Hyper-V).
        logical_sector_size: 512 or 4096 (a child always uses its parent's).
        physical_sector_size: 512 or 4096 (4096 by default; a child uses its parent's).
        parent: parent file of a differencing disk.
        overwrite: replace an existing file.
        creator: creator string of the file identifier.
        ids: GUIDs to use (for reproducible files).
        log_size: log length in bytes (multiple of 1 MiB).
        parent_search_dirs: where to look for the parent's own parents when checking it opens.
    """
    path = os.fspath(path)
    ids = ids or CreateIds()
    if parent is not None:
        type = "differencing"
    if type not in DISK_TYPES:
        raise InvalidRequestError(f"unknown disk type {type!r} (dynamic, fixed or differencing)")
    if type == "differencing" and parent is None:
        raise InvalidRequestError("a differencing disk needs a parent")
    destination = output.resolve(path, overwrite=overwrite)
    if log_size <= 0 or log_size % c.ALIGNMENT:
        raise InvalidRequestError(f"log size {log_size} is not a positive multiple of 1 MiB")

    locator = None
    disk_id = ids.disk_id
    if type == "differencing":
        if os.path.abspath(os.fspath(parent)) == os.path.abspath(path):
            raise InvalidRequestError("a disk cannot be its own parent")
        with open_image(parent, search_dirs=parent_search_dirs) as parent_image:
            # The new file must not replace its parent or any ancestor (same inode, whatever the path).
            output.resolve(path, overwrite=overwrite, sources=output.chain_identities(parent_image))
            p_logical = parent_image.logical_sector_size
            if logical_sector_size not in (None, p_logical):
                raise InvalidRequestError(f"the parent has {p_logical}-byte logical sectors; a child must match")
            logical_sector_size = p_logical
            physical_sector_size = physical_sector_size or parent_image.physical_sector_size
            if size is not None and size < parent_image.virtual_size:
                raise InvalidRequestError(f"a child cannot be smaller than its parent ({parent_image.virtual_size})")
            size = parent_image.virtual_size if size is None else size
            disk_id = disk_id or parent_image.disk_id
            locator = parent_locator_entries(path, os.fspath(parent), parent_image.data_write_guid)
        block_size = block_size or DIFFERENCING_BLOCK_SIZE
    if size is None:
        raise InvalidRequestError("a size is needed for a new base disk")
    params = disk_parameters(size, type, block_size, logical_sector_size, physical_sector_size, disk_id)
    with output.staged(destination) as (_tmp, fd):
        write_new_file(fd, path, params, locator, ids, creator, log_size)
    return path


def disk_parameters(size: int, type: str, block_size: int | None, logical_sector_size: int | None,
                    physical_sector_size: int | None, disk_id: uuid.UUID | None = None) -> DiskParameters:
    """Parameters of a new disk, defaults filled in and checked (raises InvalidRequestError)."""
    block_size = block_size or c.DEFAULT_BLOCK_SIZE
    logical_sector_size = logical_sector_size or 512
    physical_sector_size = physical_sector_size or 4096
    validate_request(size, block_size, logical_sector_size, physical_sector_size)
    return DiskParameters(
        block_size=block_size, leave_block_allocated=type == "fixed", has_parent=type == "differencing",
        virtual_size=size, virtual_disk_id=disk_id or uuid.uuid4(), logical_sector_size=logical_sector_size,
        physical_sector_size=physical_sector_size)


def write_new_file(fd: int, path: str, params: DiskParameters, locator, ids: CreateIds, creator: str,
                   log_size: int) -> None:
    """Lay a new empty disk out in the empty file open as ``fd`` (``path`` names it in errors)."""
    geometry = Geometry(params.virtual_size, params.block_size, params.logical_sector_size, params.has_parent)
    log_offset = c.HEADER_SECTION_SIZE
    metadata_offset = log_offset + log_size
    metadata_length = c.DEFAULT_METADATA_REGION_SIZE
    bat_offset = metadata_offset + metadata_length
    bat_length = max(align_up(geometry.bat_entries * c.BAT_ENTRY_SIZE), c.ALIGNMENT)
    data_offset = bat_offset + bat_length

    # An empty BAT is all zeros (NOT_PRESENT): the file is extended over it and the BAT left as a hole, so a
    # 64 TiB disk's 512 MiB BAT costs neither time nor space. Only a fixed disk's entries are written.
    file_size = data_offset
    if params.leave_block_allocated:
        file_size = data_offset + geometry.data_blocks * params.block_size

    header = Header(sequence_number=1, file_write_guid=ids.file_write_guid, data_write_guid=ids.data_write_guid,
                    log_guid=c.ZERO_GUID, log_version=c.LOG_VERSION, version=c.HEADER_VERSION,
                    log_length=log_size, log_offset=log_offset)
    regions = [RegionEntry(c.BAT_REGION_GUID, bat_offset, bat_length, True),
               RegionEntry(c.METADATA_REGION_GUID, metadata_offset, metadata_length, True)]
    identifier = layouts.FileIdentifier.build({"creator": creator})

    try:
        os.ftruncate(fd, file_size)
        os.pwrite(fd, identifier, c.FILE_IDENTIFIER_OFFSET)
        os.pwrite(fd, header.to_bytes(), c.HEADER_OFFSETS[0])
        header2 = Header(**{**header.__dict__, "sequence_number": 2})
        os.pwrite(fd, header2.to_bytes(), c.HEADER_OFFSETS[1])
        table = build_region_table(regions)
        for offset in c.REGION_TABLE_OFFSETS:
            os.pwrite(fd, table, offset)
        os.pwrite(fd, layout_metadata_region(system_items(params, locator), metadata_length), metadata_offset)
        if params.leave_block_allocated:
            write_fixed_bat(fd, geometry, bat_offset, data_offset)
        os.fsync(fd)
    except OSError as exc:
        raise VhdxError(f"cannot write: {exc.strerror}", path=path) from None


def write_fixed_bat(fd: int, geometry: Geometry, bat_offset: int, data_offset: int) -> None:
    """Write a fixed disk's BAT (every block present, contiguous in virtual order) one window of chunks at a time."""
    ratio, stride = geometry.chunk_ratio, geometry.chunk_ratio + 1
    window_chunks = max(1, WINDOW_ENTRIES // stride)
    for k0 in range(0, geometry.sector_bitmap_blocks, window_chunks):
        k1 = min(geometry.sector_bitmap_blocks, k0 + window_chunks)
        e0, e1 = k0 * stride, min(geometry.bat_entries, k1 * stride)
        blocks = np.arange(k0 * ratio, min(geometry.data_blocks, k1 * ratio), dtype=np.int64)
        entries = np.zeros(e1 - e0, dtype=BAT_DTYPE)
        offsets = np.uint64(data_offset) + blocks.astype(np.uint64) * np.uint64(geometry.block_size)
        entries[geometry.payload_index(blocks) - e0] = offsets | np.uint64(c.BatState.FULLY_PRESENT)
        os.pwrite(fd, entries.tobytes(), bat_offset + e0 * c.BAT_ENTRY_SIZE)
