"""vhdx-chain: read, check, repair and merge VHDX/AVHDX disks and their checkpoint chains.

Public API: ``open`` (alias ``open_image``), the image and stream classes, and the error tree.
"""

from __future__ import annotations

from vhdx.disk.image import VhdxImage, VirtualDiskStream, open_image
from vhdx.errors import (
    ChainError,
    ChainLoopError,
    ChecksumError,
    DependentsError,
    FormatError,
    InvalidRequestError,
    LockedError,
    LogReplayRequired,
    MergeError,
    ParentMismatchError,
    ParentNotFoundError,
    UnsupportedError,
    VhdxError,
)
from vhdx.format.constants import BatState, DiskType, SbState
from vhdx.ops.convert import flatten
from vhdx.ops.create import create
from vhdx.ops.merge import MergeResult, abort_merge, merge
from vhdx.ops.relink import set_parent

# ``vhdx.ops.create``, ``vhdx.ops.merge`` and ``vhdx.set_parent`` are the functions (the documented API); their modules
# stay importable by name (``from vhdx.ops.merge import plan_merge``).

open = open_image  # noqa: A001 - ``vhdx.open(path)`` is the documented entry point

__all__ = [
    "BatState",
    "ChainError",
    "ChainLoopError",
    "ChecksumError",
    "DependentsError",
    "DiskType",
    "FormatError",
    "InvalidRequestError",
    "LockedError",
    "LogReplayRequired",
    "MergeError",
    "ParentMismatchError",
    "ParentNotFoundError",
    "SbState",
    "UnsupportedError",
    "VhdxError",
    "VhdxImage",
    "VirtualDiskStream",
    "open",
    "open_image",
    "create",
    "flatten",
    "merge",
    "abort_merge",
    "MergeResult",
    "set_parent",
]
