"""Pointing a differencing disk at a (new) parent: ``Set-VHD -ParentPath`` semantics.

The parent locator is rebuilt with the parent's DataWriteGuid as ``parent_linkage`` and fresh relative and
absolute paths; unknown keys are kept, stale volume paths dropped. The metadata region change goes through
the child's log. The child's own DataWriteGuid is left alone, so its own children stay linked to it.

References: [MS-VHDX] §2.6.2.6.3 (locator entries), §2.6.1.2 (metadata updates through the log).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vhdx.disk.image import open_image
from vhdx.errors import InvalidRequestError, ParentMismatchError
from vhdx.format import constants as c
from vhdx.format.guid import format_guid_text
from vhdx.ops.create import locator_paths
from vhdx.structures.metadata import MetadataItem, build_parent_locator, read_items


@dataclass(frozen=True)
class RelinkResult:
    child: str
    parent: str
    old_entries: tuple[tuple[str, str], ...]
    new_entries: tuple[tuple[str, str], ...]
    linkage_matched: bool
    warnings: tuple[str, ...] = ()  # what differs between the new parent and the child, even when accepted


def plan_locator(child_path: str, parent_path: str, old_entries, parent_guid) -> list[tuple[str, str]]:
    """New locator entries: linkage first, then paths, then the unknown keys of the old locator."""
    managed = {c.PARENT_LINKAGE_KEY, c.PARENT_LINKAGE2_KEY, *c.PARENT_PATH_KEYS}
    kept = [(k, v) for k, v in old_entries if k not in managed]
    return [(c.PARENT_LINKAGE_KEY, format_guid_text(parent_guid)), *locator_paths(child_path, parent_path), *kept]


def rewrite_locator(image, entries) -> None:
    """Write ``entries`` as the parent locator of ``image`` (open for writing) through its log.

    The one locator rewrite, used by set-parent and by merge (relinking, parent_linkage2). A user item that
    happens to carry the locator's GUID is a different item and stays as it is.
    """
    items = [MetadataItem(i.item_id, i.flags, build_parent_locator(entries))
             if i.item_id == c.PARENT_LOCATOR_GUID and not i.flags & c.META_IS_USER else i
             for i in read_items(image.io, image.metadata)]
    image.writer.begin(changes_data=False)
    image.writer.rewrite_metadata(items)


def set_parent(child_path, parent_path, *, ignore_id_mismatch: bool = False, dry_run: bool = False) -> RelinkResult:
    """Point ``child_path`` at ``parent_path``; refuse a parent whose DataWriteGuid does not match unless told."""
    child_path, parent_path = os.fspath(child_path), os.fspath(parent_path)
    if os.path.abspath(child_path) == os.path.abspath(parent_path):
        raise InvalidRequestError("a disk cannot be its own parent")
    with open_image(parent_path) as parent, open_image(child_path, writable=not dry_run, orphan=True) as child:
        if not child.has_parent:
            raise InvalidRequestError(f"{child_path} is not a differencing disk")
        if parent.logical_sector_size != child.logical_sector_size:
            raise InvalidRequestError(f"sector sizes differ: parent {parent.logical_sector_size}, child "
                                      f"{child.logical_sector_size}")
        if parent.virtual_size > child.virtual_size:
            raise InvalidRequestError(f"the parent ({parent.virtual_size} bytes) is larger than the child "
                                      f"({child.virtual_size} bytes)")
        locator = child.params.parent_locator
        matched = parent.data_write_guid in locator.linkages
        if not matched and not ignore_id_mismatch:
            raise ParentMismatchError(
                f"{parent_path} has DataWriteGuid {parent.data_write_guid}, the child expects "
                f"{' or '.join(str(g) for g in locator.linkages) or 'none'}",
                structure="Parent Locator", path=child_path, hint="ignore_id_mismatch")
        warnings = parent_differences(parent, child)
        new_entries = plan_locator(child_path, parent_path, locator.entries, parent.data_write_guid)
        if not dry_run:
            rewrite_locator(child, new_entries)
        return RelinkResult(child_path, parent_path, locator.entries, tuple(new_entries), matched, warnings)


def parent_differences(parent, child) -> tuple[str, ...]:
    """Signs that PARENT is not the disk CHILD was made from (Hyper-V keeps the virtual size and disk id)."""
    found = []
    if parent.virtual_size != child.virtual_size:
        found.append(f"the parent's virtual size ({parent.virtual_size} bytes) differs from the child's "
                     f"({child.virtual_size} bytes)")
    if parent.disk_id != child.disk_id:
        found.append(f"the parent's disk id ({parent.disk_id}) differs from the child's ({child.disk_id})")
    return tuple(found)
