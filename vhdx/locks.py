"""Writer locks a VHDX file takes so that our tools and QEMU both see a writer at work.

References: QEMU block/file-posix.c (image locking bytes); flock(2); fcntl(2) open file description locks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from vhdx.errors import LockedError, VhdxError

# A writer holds two locks, so that both our own tools and QEMU (qemu-io, qemu-nbd, qemu-img, a running VM)
# see it: an exclusive flock, and QEMU's image-locking bytes. QEMU (block/file-posix.c) takes a shared
# open-file-description lock on byte 100 + bit for each permission it uses and on byte 200 + bit for each
# permission it does not let others have. Permission bits: consistent read 0, write 1, write-unchanged 2,
# resize 3.
QEMU_PERM_BASE = 100
QEMU_SHARED_BASE = 200
QEMU_PERM_WRITE = 1
QEMU_PERM_RESIZE = 3
# A writer uses every permission and lets others read (readers warn), but not write or resize.
WRITER_PERMS = (0, 1, 2, 3)
WRITER_UNSHARED = (QEMU_PERM_WRITE, QEMU_PERM_RESIZE)
_FLOCK = "hhqqi4x"  # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding)
IN_USE = "in use by another process (open for writing, or a QEMU process forbids writes)"


def _ofd(fd: int, command: int, kind: int, byte: int) -> int:
    """One open-file-description lock request on a single byte; returns the l_type the kernel answers."""
    answer = fcntl.fcntl(fd, command, struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0))
    return struct.unpack(_FLOCK, answer)[0]


def _ofd_supported() -> bool:
    return hasattr(fcntl, "F_OFD_SETLK")


def _qemu_byte_taken(fd: int, byte: int) -> bool:
    """True when another open file description holds a lock on ``byte`` (our own never conflicts)."""
    try:
        return _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK
    except OSError:
        return False  # a file system without byte-range locks (QEMU's locking=auto gives up there too)


def take_writer_lock(fd: int) -> None:
    """Lock ``fd`` for writing against our tools and QEMU; raise LockedError when someone is in the way.

    As QEMU does, the bytes are locked first and checked after, so two processes racing cannot both win.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise LockedError(IN_USE) from None
        raise VhdxError(f"cannot lock: {exc.strerror}") from None
    if not _ofd_supported():
        return
    wanted = [QEMU_PERM_BASE + bit for bit in WRITER_PERMS] + [QEMU_SHARED_BASE + bit for bit in WRITER_UNSHARED]
    try:
        for byte in wanted:
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise LockedError(IN_USE) from None
        return  # no byte-range locks on this file system: flock alone protects us from our own tools
    # Someone forbids a permission we use, or uses one we forbid.
    conflicts = [QEMU_SHARED_BASE + bit for bit in WRITER_PERMS] + [QEMU_PERM_BASE + bit for bit in WRITER_UNSHARED]
    if any(_qemu_byte_taken(fd, byte) for byte in conflicts):
        raise LockedError(IN_USE)


def writer_lock_held(fd: int) -> bool:
    """True when another process has the file open for writing: our flock, or QEMU's write permission byte."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return _ofd_supported() and _qemu_byte_taken(fd, QEMU_PERM_BASE + QEMU_PERM_WRITE)
