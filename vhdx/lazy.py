"""numpy, imported the first time it is used (issue 15: start-up).

Opening a disk whose BAT windows each repeat one entry (an empty disk, a qemu-made 64 TiB BAT of ZERO entries)
needs no array, so ``vhdx info`` of such a disk never pays numpy's import, the largest part of a command's
start-up. The modules of the open path take ``np`` from here. The first attribute read imports numpy; every
attribute read is then kept on the proxy, so later reads cost what a module attribute read costs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


class _OnFirstUse:
    """Stands for a module until an attribute of it is read; then imports it and keeps what was read."""

    def __init__(self, module_name: str) -> None:
        self.__module_name = module_name

    def __getattr__(self, attr: str) -> Any:  # only called for attributes not kept yet
        if attr.startswith("_OnFirstUse__"):
            raise AttributeError(attr)
        value = getattr(importlib.import_module(self.__module_name), attr)
        setattr(self, attr, value)
        return value

    def __repr__(self) -> str:
        return f"<{self.__module_name}, imported on first use>"


if TYPE_CHECKING:
    import numpy as np
else:
    np = _OnFirstUse("numpy")

__all__ = ["np"]
