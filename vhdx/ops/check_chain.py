"""Check's chain step: find the parent a differencing disk names, judge it, and say whether to check it next.

The parent is probed with the same loaders the reader uses (headers, log, region table, metadata) so a parent
the reader would refuse is "unreadable" here too; the child's sector size and virtual size must fit it.

References: [MS-VHDX] §2.6.2.6 (parent locator), §3.2 (differencing disks).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vhdx.disk import chain as _chain
from vhdx.errors import VhdxError
from vhdx.findings import Severity
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.structures.file import VhdxFile
from vhdx.structures.metadata import DiskParameters

if TYPE_CHECKING:
    from vhdx.ops.check import CheckContext, CheckOptions


def file_identity(io: ImageIO) -> tuple | None:
    """(device, inode) of an open file, to spot a chain that refers back to itself."""
    if io.fd is None:
        return None
    st = os.fstat(io.fd)
    return (st.st_dev, st.st_ino)


@dataclass(frozen=True)
class _ParentProbe:
    data_write_guid: uuid.UUID
    params: DiskParameters
    identity: tuple | None


def _probe_parent(path: str) -> _ParentProbe:
    """Read just enough of a candidate parent to judge it: headers, (log), region table, metadata."""
    io = ImageIO.open(path)
    try:
        loaded = VhdxFile.load(io, bat=False, strict_log=False)
        return _ParentProbe(loaded.data_write_guid, loaded.params, file_identity(io))
    finally:
        io.close()


def check_parent(ctx: CheckContext, options: CheckOptions, visited: tuple) -> str | None:
    """Find and judge the parent; returns its path when the chain goes on being checked (``options.chain``)."""
    locator = ctx.locator
    if locator is None:
        return None
    region = ctx.metadata_region
    entry = next(e for e in ctx.metadata_entries if e.item_id == c.PARENT_LOCATOR_GUID and not e.is_user)
    where = region.file_offset + entry.offset
    linkages = locator.linkages
    open_options = _chain.OpenOptions(parent=options.parent, search_dirs=options.search_dirs,
                                      ignore_id_mismatch=options.ignore_id_mismatch)
    tried, mismatched, found = [], [], None
    for cand in _chain.candidates(ctx.path, locator, open_options, options.parent):
        try:
            st = os.stat(cand.path)
        except OSError as exc:
            tried.append(f"{cand.path} ({exc.strerror})")
            continue
        except ValueError:  # e.g. a NUL inside the locator's path
            tried.append(f"{cand.path!r} (not a usable path)")
            continue
        if (st.st_dev, st.st_ino) in visited:
            ctx.add(Severity.ERROR, "CHAIN_LOOP", "Parent Locator", where,
                    f"the parent {cand.path} (from {cand.source}) is already part of this chain")
            return None
        try:
            probe = _probe_parent(cand.path)
        except VhdxError as exc:
            tried.append(f"{cand.path} (unreadable: {exc})")
            continue
        if probe.data_write_guid in linkages or (options.ignore_id_mismatch and not cand.name_only):
            found = (cand, probe)
            break
        tried.append(f"{cand.path} (DataWriteGuid {probe.data_write_guid} does not match)")
        if not cand.name_only:
            mismatched.append((cand, probe))
    if found is None:
        listing = "; ".join(tried) or "the locator holds no usable path"
        if mismatched:
            cand, probe = mismatched[0]
            ctx.add(Severity.ERROR, "PARENT_MISMATCH", "Parent Locator", where,
                    f"parent {cand.path} has DataWriteGuid {probe.data_write_guid}, the child expects "
                    f"{' or '.join(str(g) for g in linkages) or 'no linkage'}; tried: {listing}", repairable=True)
        else:
            ctx.add(Severity.ERROR, "PARENT_NOT_FOUND", "Parent Locator", where,
                    f"no locator path leads to the parent; tried: {listing}", repairable=True)
        return None
    cand, probe = found
    if probe.params.logical_sector_size != ctx.params.logical_sector_size:
        ctx.add(Severity.ERROR, "CHAIN_SECTOR_SIZE", "Logical Sector Size", where,
                f"the parent {cand.path} has {probe.params.logical_sector_size}-byte sectors, this file "
                f"{ctx.params.logical_sector_size}")
    if probe.params.virtual_size > ctx.params.virtual_size:
        ctx.add(Severity.ERROR, "CHAIN_VIRTUAL_SIZE", "Virtual Disk Size", where,
                f"the parent {cand.path} ({probe.params.virtual_size} bytes) is larger than this disk "
                f"({ctx.params.virtual_size} bytes)")
    if not options.chain:
        return None
    limit = _chain.depth_limit()
    if len(visited) >= limit:
        ctx.add(Severity.ERROR, "CHAIN_TOO_DEEP", "Parent Locator", where,
                f"{_chain.too_deep(limit).message}; the parent {cand.path} and its ancestors were not checked")
        return None
    return cand.path
