"""vhdx-chain: read, check, repair and merge VHDX/AVHDX disks and their checkpoint chains.

Public API (verb + noun, never the name of a submodule): ``open_image`` (alias ``open``), ``create_image``,
``merge_chain``, ``abort_merge``, ``flatten``, ``check_image``, ``repair_image``, ``set_parent``, the image and
stream classes, the state enums and the error tree. Each name is imported on first use (PEP 562), so
``import vhdx`` costs almost nothing and loads neither numpy nor the merge engine.
"""

from __future__ import annotations

import importlib

# The one list of public names: name -> "module:attribute".
_PUBLIC = {
    "open_image": "vhdx.disk.image:open_image",
    "open": "vhdx.disk.image:open_image",  # ``vhdx.open(path)``: the documented short alias
    "create_image": "vhdx.ops.create:create",
    "merge_chain": "vhdx.ops.merge:merge",
    "abort_merge": "vhdx.ops.merge:abort_merge",
    "MergeResult": "vhdx.ops.merge:MergeResult",
    "flatten": "vhdx.ops.convert:flatten",
    "check_image": "vhdx.ops.check:check_image",
    "repair_image": "vhdx.ops.repair:repair_image",
    "set_parent": "vhdx.ops.relink:set_parent",
    "VhdxImage": "vhdx.disk.image:VhdxImage",
    "VirtualDiskStream": "vhdx.disk.image:VirtualDiskStream",
    "BatState": "vhdx.format.constants:BatState",
    "DiskType": "vhdx.format.constants:DiskType",
    "SbState": "vhdx.format.constants:SbState",
    "VhdxError": "vhdx.errors:VhdxError",
    "FormatError": "vhdx.errors:FormatError",
    "ChecksumError": "vhdx.errors:ChecksumError",
    "UnsupportedError": "vhdx.errors:UnsupportedError",
    "ChainError": "vhdx.errors:ChainError",
    "ParentNotFoundError": "vhdx.errors:ParentNotFoundError",
    "ParentMismatchError": "vhdx.errors:ParentMismatchError",
    "ChainLoopError": "vhdx.errors:ChainLoopError",
    "ChainTooDeepError": "vhdx.errors:ChainTooDeepError",
    "LockedError": "vhdx.errors:LockedError",
    "DependentsError": "vhdx.errors:DependentsError",
    "InvalidRequestError": "vhdx.errors:InvalidRequestError",
    "MergeError": "vhdx.errors:MergeError",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> object:
    """Import a public name (or a submodule, ``vhdx.ops``) on first use and keep it in the module."""
    target = _PUBLIC.get(name)
    if target is None:
        return _submodule(name)
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def _submodule(name: str) -> object:
    """``vhdx.<name>`` for a submodule not imported yet (as an eager package would have offered it)."""
    full = f"{__name__}.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name != full:
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
