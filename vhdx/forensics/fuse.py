"""A read-only FUSE file system with one file: the raw virtual disk at any layer of a chain.

Uses ``mfusepy`` (optional extra ``forensics``), which binds libfuse through ctypes. The file system is mounted
read-only; opening the file for writing fails with EROFS and no write callback exists. Requests are served one
at a time (a chain opens its parents lazily), in the foreground until the mount point is unmounted.

References: [MS-VHDX] §2.5.1.1 (reads through the chain).
"""

from __future__ import annotations

import errno
import os
import stat
import time

from vhdx.disk.image import VhdxImage
from vhdx.errors import InvalidRequestError, UnsupportedError

FUSE_DEVICE = "/dev/fuse"


def load_fuse():
    """The mfusepy module, once FUSE is usable here.

    Raises:
        UnsupportedError: mfusepy or libfuse is missing, or /dev/fuse cannot be opened.
    """
    try:
        import mfusepy  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise UnsupportedError("FUSE support needs mfusepy (pip install 'vhdx-chain[forensics]')") from None
    except OSError as exc:  # mfusepy raises when libfuse cannot be found
        raise UnsupportedError(f"FUSE support needs libfuse ({exc})") from None
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR)
    except OSError as exc:
        raise UnsupportedError(f"{FUSE_DEVICE} is not usable here ({exc.strerror})") from None
    os.close(fd)
    return mfusepy


def raw_name(path: str) -> str:
    """Name of the exposed file: the layer's file name with ``.raw`` instead of its extension."""
    return os.path.splitext(os.path.basename(path))[0] + ".raw"


def make_operations(mfusepy, image: VhdxImage, name: str):
    """The mfusepy Operations object exposing ``image``'s virtual disk as ``/name``."""
    file_path = "/" + name
    now = time.time()
    st = os.stat(image.path)

    class RawDiskOperations(mfusepy.Operations):
        use_ns = True

        def getattr(self, path, fh=None):
            times = {"st_atime": int(now * 1e9), "st_mtime": int(st.st_mtime * 1e9), "st_ctime": int(now * 1e9)}
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, **times}
            if path == file_path:
                return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": image.virtual_size,
                        "st_blocks": (image.virtual_size + 511) // 512, **times}
            raise mfusepy.FuseOSError(errno.ENOENT)

        def readdir(self, path, fh):
            if path != "/":
                raise mfusepy.FuseOSError(errno.ENOTDIR)
            return [".", "..", name]

        def open(self, path, flags):
            if path != file_path:
                raise mfusepy.FuseOSError(errno.ENOENT)
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise mfusepy.FuseOSError(errno.EROFS)
            return 0

        def read(self, path, size, offset, fh):
            if path != file_path:
                raise mfusepy.FuseOSError(errno.ENOENT)
            return image.read(offset, size) if offset < image.virtual_size else b""

        def statfs(self, path):
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": (image.virtual_size + 4095) // 4096,
                    "f_bfree": 0, "f_bavail": 0, "f_files": 1, "f_ffree": 0, "f_namemax": 255}

    return RawDiskOperations()


def mount(image: VhdxImage, mountpoint: str, *, name: str | None = None, ready=None) -> None:
    """Mount read-only and serve until unmounted (``umount MOUNTPOINT`` or ``fusermount -u``).

    Args:
        image: the layer to expose (its chain stays open while mounted).
        mountpoint: an existing empty directory.
        name: file name inside the mount (default: the layer's name with ``.raw``).
        ready: called with the exposed file's path just before serving starts.
    """
    mfusepy = load_fuse()
    if not os.path.isdir(mountpoint):
        raise InvalidRequestError(f"{mountpoint} is not a directory")
    if os.listdir(mountpoint):
        raise InvalidRequestError(f"{mountpoint} is not empty")
    name = name or raw_name(image.path)
    _ = image.layers  # open the whole chain now: a missing parent fails here, not at the first read
    ops = make_operations(mfusepy, image, name)
    if ready is not None:
        ready(os.path.join(os.path.abspath(mountpoint), name))
    try:
        mfusepy.FUSE(ops, mountpoint, foreground=True, ro=True, nothreads=True, fsname="vhdx",
                     subtype="vhdx", default_permissions=True)
    except RuntimeError as exc:
        raise UnsupportedError(f"cannot mount {mountpoint}: {exc}") from None
