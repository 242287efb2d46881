"""A merge's safety checks before anything is written: which layers, pending logs and journals, dependents, space."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence

from vhdx.disk.image import VhdxImage, read_disk_parameters
from vhdx.errors import MergeError, UnsupportedError, VhdxError
from vhdx.ops.merge import journal as mj
from vhdx.ops.merge.inputs import dest_kind_of
from vhdx.ops.merge.plan import MergePlan


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def destination_index(layers: Sequence[VhdxImage], into) -> int:
    if len(layers) < 2:
        raise MergeError(f"{layers[0].path} is not a differencing disk: there is nothing to merge it into")
    if into is None:
        return 1
    for i, layer in enumerate(layers[1:], start=1):
        if same_file(layer.path, os.fspath(into)):
            return i
    if same_file(layers[0].path, os.fspath(into)):
        raise MergeError("a disk cannot be merged into itself")
    raise MergeError(f"{os.fspath(into)} is not an ancestor of {layers[0].path}; the chain is: "
                     + " -> ".join(layer.path for layer in layers))


def find_dependents(folders, exclude: Sequence[str]) -> dict[uuid.UUID, list[str]]:
    """Differencing disks in ``folders`` (not in ``exclude``) by the parent DataWriteGuids they accept."""
    found: dict[uuid.UUID, list[str]] = {}
    excluded = [os.path.realpath(p) for p in exclude]
    seen = set()
    for name, path in mj.folder_entries(folders):
        real = os.path.realpath(path)
        if real in seen or real in excluded or not name.lower().endswith((".vhdx", ".avhdx")):
            continue
        seen.add(real)
        if not os.path.isfile(path):
            continue
        try:
            params = read_disk_parameters(path)  # no BAT: folders may hold huge sparse disks
        except VhdxError:
            continue
        if params.has_parent:
            for guid in params.parent_locator.linkages:
                found.setdefault(guid, []).append(path)
    return found


def preflight(layers: Sequence[VhdxImage], k: int, search_dirs, force: bool,
               probe_writers: bool = False) -> tuple[list[str], list[str]]:
    """Refuse unsafe merges; returns (children of the merged child to relink, warnings).

    ``probe_writers``: ask whether another process writes a layer (a dry run, which holds no lock itself).
    """
    dest = layers[k]
    for layer in layers[: k + 1]:
        if layer.log.is_dirty:
            raise MergeError("the log holds updates not yet applied; run `vhdx repair` (or open it for writing) "
                             "first", path=layer.path, structure="Log")
        if probe_writers and layer.io.writer_lock_held():
            raise MergeError("another process has this file open for writing", path=layer.path)
        if layer.logical_sector_size != dest.logical_sector_size:
            raise MergeError(f"logical sector size {layer.logical_sector_size} differs from the destination's "
                             f"({dest.logical_sector_size})", path=layer.path)
    for layer in layers[: k + 1]:
        pending = mj.journal_for_destination(layer.path)
        if pending is not None:
            raise MergeError(f"an interrupted merge of {pending.child} into this disk is pending", path=layer.path,
                             hint="merge_pending", hint_subject=pending.child)
    if dest_kind_of(dest) == "fixed" and layers[0].virtual_size > dest.virtual_size:
        raise UnsupportedError("growing a fixed destination to the child's larger size is not supported",
                               path=dest.path)
    folders = list(dict.fromkeys([*(os.path.dirname(os.path.abspath(layer.path)) for layer in layers),
                                  *(os.fspath(d) for d in search_dirs)]))
    deps = find_dependents(folders, [layer.path for layer in layers])
    warnings = []
    for i in range(1, k + 1):
        others = deps.get(layers[i].data_write_guid, [])
        if not others:
            continue
        what = "the destination" if i == k else f"{layers[i].path}, which the merge folds in"
        text = f"{', '.join(others)} depend{'s' if len(others) == 1 else ''} on {what}"
        if not force:
            raise MergeError(f"{text}; merging would invalidate {'it' if len(others) == 1 else 'them'} (forced, they "
                             "will then refuse to open instead of reading wrong data)", hint="force")
        warnings.append(f"{text}; {'it' if len(others) == 1 else 'they'} will no longer open")
    return deps.get(layers[0].data_write_guid, []), warnings


def check_free_space(destination: str, plan: MergePlan) -> None:
    need = plan.new_bytes
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(destination)))
    except (OSError, AttributeError):
        return
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise MergeError(f"not enough free space: the merge needs up to {need} bytes, {free} are free",
                         path=destination)
