"""A synthetic estate of small disks for scan tests: chains, branches, orphans, broken links, a dirty log.

Disks are written directly from the library's own structure builders, with only the bytes that matter (the
metadata region and the BAT stay sparse), so a few hundred of them take well under a second; ``vhdx.create``
would write and fsync a full MiB of metadata per file.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field, replace

from vhdx.create import parent_locator_entries
from vhdx.format import constants as c
from vhdx.format import layouts
from vhdx.header import Header, load_headers
from vhdx.io import ImageIO
from vhdx.log import DataWrite, build_entry
from vhdx.merge_journal import MergedLayer, MergeJournal, write_journal
from vhdx.metadata import DiskParameters, layout_metadata_region, system_items
from vhdx.region import RegionEntry, build_region_table

MIB = c.MiB
LOG_OFFSET, META_OFFSET, BAT_OFFSET = MIB, 2 * MIB, 3 * MIB
FILE_SIZE = 4 * MIB
VIRTUAL_SIZE = 4 * MIB


def write_disk(path: str, parent: str | None = None, *, creator: str = "estate") -> uuid.UUID:
    """Write a small dynamic disk (or a child of ``parent``) and return its DataWriteGuid."""
    locator = None
    disk_id = uuid.uuid4()
    if parent is not None:
        locator = parent_locator_entries(path, parent, data_write_guid(parent))
    params = DiskParameters(block_size=MIB, leave_block_allocated=False, has_parent=parent is not None,
                            virtual_size=VIRTUAL_SIZE, virtual_disk_id=disk_id, logical_sector_size=512,
                            physical_sector_size=4096)
    items = system_items(params, locator)
    used = c.METADATA_TABLE_SIZE + sum(len(i.data) for i in items)
    header = Header(sequence_number=1, file_write_guid=uuid.uuid4(), data_write_guid=uuid.uuid4(),
                    log_guid=c.ZERO_GUID, log_version=c.LOG_VERSION, version=c.HEADER_VERSION, log_length=MIB,
                    log_offset=LOG_OFFSET)
    regions = [RegionEntry(c.BAT_REGION_GUID, BAT_OFFSET, MIB, True),
               RegionEntry(c.METADATA_REGION_GUID, META_OFFSET, MIB, True)]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, FILE_SIZE)
        os.pwrite(fd, layouts.FileIdentifier.build({"creator": creator}), c.FILE_IDENTIFIER_OFFSET)
        os.pwrite(fd, header.to_bytes(), c.HEADER_OFFSETS[0])
        os.pwrite(fd, replace(header, sequence_number=2).to_bytes(), c.HEADER_OFFSETS[1])
        table = build_region_table(regions)
        for offset in c.REGION_TABLE_OFFSETS:
            os.pwrite(fd, table, offset)
        os.pwrite(fd, layout_metadata_region(items, -(-used // 4096) * 4096), META_OFFSET)
    finally:
        os.close(fd)
    return header.data_write_guid


def _headers(path: str):
    io = ImageIO.open(path)
    try:
        return load_headers(io)
    finally:
        io.close()


def data_write_guid(path: str) -> uuid.UUID:
    return _headers(path).current.data_write_guid


def _rewrite_current(path: str, **changes) -> None:
    """Both header copies take the current header with ``changes`` (higher sequence numbers)."""
    current = _headers(path).current
    first = replace(current, sequence_number=current.sequence_number + 1, **changes)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, first.to_bytes(), c.HEADER_OFFSETS[0])
        os.pwrite(fd, replace(first, sequence_number=first.sequence_number + 1).to_bytes(), c.HEADER_OFFSETS[1])
    finally:
        os.close(fd)


def rewrite_data(path: str) -> None:
    """What writing to a disk does to it: a new DataWriteGuid (children made before no longer match)."""
    _rewrite_current(path, data_write_guid=uuid.uuid4())


def make_dirty(path: str) -> None:
    """Leave a complete, unapplied log entry (it rewrites the first BAT sector with what it holds already)."""
    guid = uuid.uuid4()
    with open(path, "rb") as f:
        f.seek(BAT_OFFSET)
        sector = f.read(c.LOG_SECTOR_SIZE)
    entry = build_entry([DataWrite(BAT_OFFSET, sector)], sequence_number=1, log_guid=guid, tail=0,
                        flushed_file_offset=FILE_SIZE, last_file_offset=FILE_SIZE)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, entry, LOG_OFFSET)
    finally:
        os.close(fd)
    _rewrite_current(path, log_guid=guid)


def leave_merge_journal(child: str, destination: str) -> str:
    """The journal an interrupted merge of ``child`` into ``destination`` leaves beside the destination."""
    journal = MergeJournal(child=child, destination=destination,
                           destination_guid=str(data_write_guid(destination)), new_data_write_guid=str(uuid.uuid4()),
                           layers=(MergedLayer(child, str(data_write_guid(child))),), dependents=(),
                           plan_digest="0" * 64, state="planned")
    write_journal(journal)
    return journal.path


@dataclass
class Estate:
    """What was built and what a scan must find."""

    root: str
    disks: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    dirty: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)  # disks a pending journal names
    vm_configs: list[str] = field(default_factory=list)
    other_files: int = 0
    trees: int = 0
    deepest: int = 0


def build_estate(root: str, vms: int = 40) -> Estate:
    """``vms`` folders, each a base disk with a checkpoint chain (every third one branching), then the faults.

    Faults: in vm001 the middle layer of the chain is deleted (its child is an orphan, holding its own
    descendants); in vm002 the base is written after its child was made (broken link); vm003's last checkpoint
    has a dirty log; vm004 has a pending merge journal; every folder has a .vmcx and a non-disk file.
    """
    estate = Estate(root)
    for v in range(vms):
        folder = os.path.join(root, f"vm{v:03d}")
        os.makedirs(folder)
        base = os.path.join(folder, "base.vhdx")
        write_disk(base)
        chain = [base]
        depth = 3 + v % 5
        for level in range(1, depth):
            child = os.path.join(folder, f"cp{level}.avhdx")
            write_disk(child, chain[-1])
            chain.append(child)
        layers = list(chain)
        if v % 3 == 0:  # a branch: a second checkpoint off the first one
            branch = os.path.join(folder, "branch.avhdx")
            write_disk(branch, chain[1])
            layers.append(branch)
        estate.disks.extend(layers)
        estate.trees += 1
        estate.deepest = max(estate.deepest, depth)
        config = os.path.join(folder, f"vm{v:03d}.vmcx")
        with open(config, "wb") as f:
            f.write(b"\x00" * 64)
        estate.vm_configs.append(config)
        with open(os.path.join(folder, "notes.txt"), "w") as f:
            f.write("not a disk\n")
        estate.other_files += 1
    vm1 = os.path.join(root, "vm001")
    middle = os.path.join(vm1, "cp2.avhdx")  # vm001 has depth 4: base, cp1, cp2, cp3
    os.unlink(middle)
    estate.disks.remove(middle)
    estate.orphans.append(os.path.join(vm1, "cp3.avhdx"))
    estate.trees += 1
    vm2 = os.path.join(root, "vm002")
    rewrite_data(os.path.join(vm2, "base.vhdx"))
    estate.broken.append(os.path.join(vm2, "cp1.avhdx"))
    estate.trees += 1
    vm3 = os.path.join(root, "vm003")
    dirty = os.path.join(vm3, f"cp{3 + 3 % 5 - 1}.avhdx")
    make_dirty(dirty)
    estate.dirty.append(dirty)
    vm4 = os.path.join(root, "vm004")
    leave_merge_journal(os.path.join(vm4, "cp4.avhdx"), os.path.join(vm4, "cp3.avhdx"))
    estate.interrupted += [os.path.join(vm4, "cp4.avhdx"), os.path.join(vm4, "cp3.avhdx")]
    estate.disks.sort()
    return estate
