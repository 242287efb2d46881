"""Reading a chain with the peer libraries, for cross-checks (each skips when its library is missing)."""

from __future__ import annotations

import shutil

import pytest


def read_with_pyvhdi(paths: list, size: int) -> bytes:
    """paths: child first, base last."""
    pyvhdi = pytest.importorskip("pyvhdi")
    files = []
    for path in paths:
        f = pyvhdi.file()
        f.open(str(path))
        files.append(f)
    for child, parent in zip(files, files[1:], strict=False):
        child.set_parent(parent)
    try:
        return files[0].read_buffer(size)
    finally:
        for f in files:
            f.close()


def read_with_dissect(path, size: int) -> bytes:
    vhdx_mod = pytest.importorskip("dissect.hypervisor.disk.vhdx")
    with open(path, "rb") as fh:
        disk = vhdx_mod.VHDX(fh)
        disk.seek(0)
        return disk.read(size)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt-get install qemu-utils)")
    return path
