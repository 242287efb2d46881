"""The peers we compare with, and how each one reads a virtual disk; a missing peer says why it is missing."""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Callable

from .measure import READ_CHUNK


def qemu_img() -> tuple[str | None, str | None]:
    """(path, None) or (None, reason)."""
    path = shutil.which("qemu-img")
    return (path, None) if path else (None, "missing: qemu-img not installed (Debian: qemu-utils)")


def qemu_io() -> tuple[str | None, str | None]:
    path = shutil.which("qemu-io")
    return (path, None) if path else (None, "missing: qemu-io not installed (Debian: qemu-utils)")


def _module(name: str, package: str):
    try:
        return importlib.import_module(name), None
    except ImportError:
        return None, f"missing: python package {package} not installed"


def pyvhdi():
    return _module("pyvhdi", "libvhdi-python")


def dissect_vhdx():
    return _module("dissect.hypervisor.disk.vhdx", "dissect.hypervisor")


class PyvhdiDisk:
    """A libvhdi view of a chain: every layer opened and linked with ``set_parent`` (libvhdi needs that)."""

    def __init__(self, layers) -> None:
        mod, _ = pyvhdi()
        self.files = []
        for path in layers:
            f = mod.file()
            f.open(path)
            self.files.append(f)
        for child, parent in zip(self.files[:0:-1], self.files[-2::-1], strict=False):
            child.set_parent(parent)
        self.top = self.files[-1]
        self.size = self.top.get_media_size()

    def read(self, offset: int, length: int) -> bytes:
        return self.top.read_buffer_at_offset(length, offset)

    def close(self) -> None:
        for f in reversed(self.files):
            f.close()


class DissectDisk:
    """A dissect.hypervisor view of the top file (it finds the parents through the parent locator)."""

    def __init__(self, layers) -> None:
        mod, _ = dissect_vhdx()
        self.fh = open(layers[-1], "rb")  # noqa: SIM115 - closed in close()
        self.disk = mod.VHDX(self.fh)
        self.size = self.disk.size

    def read(self, offset: int, length: int) -> bytes:
        self.disk.seek(offset)
        return self.disk.read(length)

    def close(self) -> None:
        parent = getattr(self.disk, "parent", None)
        while parent is not None:
            fh = getattr(parent, "fh", None)
            if fh is not None:
                fh.close()
            parent = getattr(parent, "parent", None)
        self.fh.close()


READERS: dict[str, tuple[Callable, Callable]] = {
    "pyvhdi": (PyvhdiDisk, pyvhdi),
    "dissect": (DissectDisk, dissect_vhdx),
}


def read_loop_to_raw(disk, out_path: str) -> None:
    """What a user of a read-only library does to flatten: read everything, write what is not zero, fsync."""
    zeros = bytes(READ_CHUNK)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, disk.size)
        for offset in range(0, disk.size, READ_CHUNK):
            data = disk.read(offset, min(READ_CHUNK, disk.size - offset))
            if data != zeros[: len(data)]:
                os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
