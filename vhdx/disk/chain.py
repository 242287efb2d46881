"""Finding a differencing disk's parent: locator paths, Windows path translation, linkage GUID check.

Order of candidates: the caller's explicit parent path; the locator's relative_path, volume_path and
absolute_win32_path (§2.6.2.6.3 order); then the parent's file name in the caller's search directories and,
last, next to the child. A candidate must be a regular file and its current DataWriteGuid must equal
parent_linkage or parent_linkage2; a name-only match (search directory, same folder) is accepted only when
the GUID matches, even with ``ignore_id_mismatch``.

Depth: a chain holds at most ``MAX_CHAIN_DEPTH`` files (the opened one and its ancestors). Every reader (through
``OpenOptions``) and ``check --chain`` refuse a deeper chain with "deeper than N layers", never calling it a loop.

References: [MS-VHDX] §2.6.2.6 (parent locator), §2.2.2 (DataWriteGuid).
"""

from __future__ import annotations

import ntpath
import os
import stat
import sys
from dataclasses import dataclass, field

from vhdx.errors import ChainLoopError, ChainTooDeepError, ParentMismatchError, ParentNotFoundError, VhdxError

# The one limit on chain depth (files, child included). Hyper-V allows 50 checkpoints per VM; this leaves room for
# long-lived backup chains while bounding open files and the work of a walk. Walks are iterative, so the limit is
# not tied to Python's recursion limit.
MAX_CHAIN_DEPTH = 1024


def depth_limit(max_depth: int | None = None) -> int:
    """The depth limit in force: an explicit ``max_depth`` or ``MAX_CHAIN_DEPTH`` (read at call time)."""
    return MAX_CHAIN_DEPTH if max_depth is None else max_depth


def too_deep(limit: int, **kw) -> ChainTooDeepError:
    """The error for a chain with more than ``limit`` files (one wording for every reader and check)."""
    return ChainTooDeepError(f"the chain is deeper than {limit} layers (the limit is vhdx.disk.chain.MAX_CHAIN_DEPTH)",
                             **kw)


@dataclass(frozen=True)
class OpenOptions:
    """How to assemble a chain.

    Attributes:
        parent: explicit path of the opened file's parent (overrides its locator).
        search_dirs: extra folders in which to look for parents by file name, at every level.
        ignore_id_mismatch: accept a parent whose DataWriteGuid does not match the child's linkage.
        orphan: do not look for a parent at all; what the file does not hold reads as zeros.
        max_depth: refuse chains deeper than this (None: ``MAX_CHAIN_DEPTH``).
        force: let a writable open change the data of a disk that other disks depend on (they stop opening).
        salvage: read payload missing from a truncated file as zeros (listed in ``VhdxImage.invented``) instead
            of refusing the file.
    """

    parent: str | None = None
    search_dirs: tuple[str, ...] = ()
    ignore_id_mismatch: bool = False
    orphan: bool = False
    max_depth: int | None = None
    force: bool = False
    salvage: bool = False

    @property
    def depth_limit(self) -> int:
        return depth_limit(self.max_depth)

    def for_parent(self) -> OpenOptions:
        """Options passed one level up: the explicit parent applies to one level only."""
        return OpenOptions(search_dirs=self.search_dirs, ignore_id_mismatch=self.ignore_id_mismatch,
                           max_depth=self.max_depth, salvage=self.salvage)


@dataclass
class Candidate:
    """A file tried as the parent, where it was found and what came of it."""

    source: str  # locator key, "--parent", "search dir" or "same folder"
    path: str
    name_only: bool = False  # found by file name alone: the GUID must match
    outcome: str = field(default="")


def _strip_extended_prefix(path: str) -> str:
    for prefix in ("\\\\?\\UNC\\", "\\\\?\\", "\\\\.\\"):
        if path.startswith(prefix):
            return ("\\\\" if prefix.endswith("UNC\\") else "") + path[len(prefix):]
    return path


def windows_path_candidates(key: str, value: str, child_dir: str) -> list[str]:
    """Host paths a locator value may mean; a Windows path is translated where that makes sense."""
    value = value.rstrip("\x00")
    if key == "relative_path":
        parts = [p for p in value.replace("\\", "/").split("/") if p not in ("", ".")]
        return [os.path.normpath(os.path.join(child_dir, *parts))] if parts else []
    if sys.platform == "win32":
        return [_strip_extended_prefix(value)]
    plain = _strip_extended_prefix(value)
    if plain.startswith("/"):
        return [plain]  # written by a POSIX tool: it is a host path already
    return []  # drive letters and volume GUIDs have no meaning here; the file-name fallback covers them


def parent_file_name(locator) -> str | None:
    """The parent's file name as the locator records it (from any of its paths)."""
    for _key, value in locator.paths:
        name = ntpath.basename(value.replace("/", "\\").rstrip("\x00"))
        if name:
            return name
    return None


def candidates(child_path: str, locator, options: OpenOptions, explicit: str | None) -> list[Candidate]:
    """All places to try, in order, without duplicates."""
    child_dir = os.path.dirname(os.path.abspath(child_path))
    found: list[Candidate] = []
    if explicit:
        found.append(Candidate("--parent", os.path.abspath(explicit)))
    for key, value in locator.paths:
        for path in windows_path_candidates(key, value, child_dir):
            found.append(Candidate(key, path))
    name = parent_file_name(locator)
    if name:
        for folder in (*options.search_dirs, child_dir):
            source = "same folder" if folder == child_dir else "search dir"
            found.append(Candidate(source, os.path.join(os.path.abspath(folder), name), name_only=True))
    unique, seen = [], set()
    for cand in found:
        key = os.path.normcase(os.path.abspath(cand.path))
        if key not in seen:
            seen.add(key)
            unique.append(cand)
    return unique


def locate_and_open_parent(child, options: OpenOptions, open_image):
    """Open the parent of ``child`` (a VhdxImage) following the locator; raise a ChainError with the reasons.

    ``open_image(path, options)`` opens a candidate file; it is passed in to keep this module free of the
    image class.
    """
    locator = child.params.parent_locator
    linkages = locator.linkages
    tried: list[Candidate] = []
    mismatched = []
    loops: list[ChainLoopError] = []
    for cand in candidates(child.path, locator, options, options.parent if options.parent else None):
        tried.append(cand)
        try:
            st = os.stat(cand.path)
        except OSError as exc:
            cand.outcome = "missing" if isinstance(exc, FileNotFoundError) else exc.strerror
            continue
        except ValueError:  # e.g. a NUL inside the locator's path
            cand.outcome = "not a usable path"
            continue
        if not stat.S_ISREG(st.st_mode):
            cand.outcome = "not a regular file"
            continue
        try:
            parent = open_image(cand.path, options.for_parent())
        except ChainTooDeepError:
            raise  # the chain goes on, but too far: not a problem of this candidate
        except ChainLoopError as exc:
            cand.outcome = "already in the chain (loop)"
            loops.append(exc)
            continue
        except VhdxError as exc:
            cand.outcome = f"unreadable ({exc})"
            continue
        if parent.data_write_guid in linkages:
            cand.outcome = "ok"
            return parent, cand
        if options.ignore_id_mismatch and not cand.name_only:
            cand.outcome = "DataWriteGuid mismatch ignored"
            return parent, cand
        cand.outcome = f"DataWriteGuid {parent.data_write_guid} does not match the linkage"
        mismatched.append((cand, parent))
        if not options.ignore_id_mismatch or cand.name_only:
            parent.close()
    listing = "; ".join(f"{c.path} ({c.outcome})" for c in tried) or "the locator holds no path"
    if loops:
        raise ChainLoopError(f"the parent locator leads back into the chain (loop); tried: {listing}",
                             structure="Parent Locator", path=child.path)
    if mismatched:
        cand = mismatched[0][0]
        raise ParentMismatchError(
            f"parent {cand.path} has DataWriteGuid {mismatched[0][1].data_write_guid}, the child expects "
            f"{' or '.join(str(g) for g in linkages) or 'no linkage'}; tried: {listing}",
            structure="Parent Locator", path=child.path, hint="ignore_id_mismatch")
    raise ParentNotFoundError(f"parent not found; tried: {listing}", structure="Parent Locator",
                              path=child.path, tried=[c.path for c in tried])
