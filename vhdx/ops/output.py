"""Where a writing command's output lands: the rules that keep it from replacing what it must not.

- A symlink stays a symlink: the output lands in the file it points to (a dangling one is refused).
- A block or character device or a FIFO is written in place (raw output only, as qemu-img and dd do);
  nothing is ever renamed over it.
- A regular file is built as an exclusive temporary next to it (``O_EXCL | O_NOFOLLOW``, a fresh random
  name, so a planted ``.part`` symlink is never followed) and renamed over the destination at the end; the
  temporary is removed whatever fails, the rename included.
- An output that is the source or any layer of its chain (same inode, whatever the path) is refused, and so
  is replacing a file another process has open for writing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from vhdx.errors import ChainError, InvalidRequestError, LockedError, VhdxError
from vhdx.locks import writer_lock_held

# Kinds of destination.
NEW, REGULAR, BLOCK_DEVICE, CHAR_DEVICE, FIFO = "new", "file", "block device", "character device", "FIFO"
_KINDS = ((stat.S_ISREG, REGULAR), (stat.S_ISBLK, BLOCK_DEVICE), (stat.S_ISCHR, CHAR_DEVICE),
          (stat.S_ISFIFO, FIFO))


@dataclass(frozen=True)
class Destination:
    """An output path as resolved before anything is written.

    Attributes:
        path: the path as given.
        target: where the bytes land (``path`` with symlinks resolved).
        kind: NEW, REGULAR, BLOCK_DEVICE, CHAR_DEVICE or FIFO.
        identity: (st_dev, st_ino) of what exists there now, else None.
    """

    path: str
    target: str
    kind: str
    identity: tuple[int, int] | None

    @property
    def in_place(self) -> bool:
        """True for devices and FIFOs: written where they are, never replaced."""
        return self.kind in (BLOCK_DEVICE, CHAR_DEVICE, FIFO)


def resolve(path, *, overwrite: bool, sources: Iterable = (), raw: bool = False) -> Destination:
    """Judge an output path before writing: raise InvalidRequestError (or LockedError) when it must not be used.

    Args:
        path: the output path the user gave.
        overwrite: whether an existing file may be replaced (``--force``).
        sources: paths or (st_dev, st_ino) pairs of every file the command reads (the whole source chain).
        raw: the output is a raw image, which may go to a device or FIFO; a VHDX needs a regular file.
    """
    path = os.fspath(path)
    target = os.path.realpath(path) if os.path.islink(path) else path
    try:
        st = os.stat(target)
    except FileNotFoundError:
        if target != path:
            raise InvalidRequestError(f"{path} is a symbolic link to {target}, which does not exist; "
                                      "refusing to write through it") from None
        return Destination(path, target, NEW, None)
    except OSError as exc:
        raise VhdxError(f"cannot use as output: {exc.strerror}", path=path) from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidRequestError(f"{path} is a directory")
    kind = next((name for test, name in _KINDS if test(st.st_mode)), None)
    if kind is None:
        raise InvalidRequestError(f"{path} is neither a regular file nor a device or FIFO")
    identity = (st.st_dev, st.st_ino)
    if identity in {_identity(source) for source in sources}:
        raise InvalidRequestError(f"{path} is the source or a layer of its chain; refusing to overwrite it")
    if not overwrite:
        raise InvalidRequestError(f"{path} exists", hint="overwrite")
    if kind != REGULAR and not raw:
        raise InvalidRequestError(f"{path} is a {kind}: a VHDX needs a regular file (only -O raw writes into "
                                  "a device or FIFO)")
    if kind == REGULAR:
        refuse_if_being_written(target)
    return Destination(path, target, kind, identity)


def _identity(source) -> tuple[int, int] | None:
    if isinstance(source, tuple):
        return source
    try:
        st = os.stat(source)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def refuse_if_being_written(path: str) -> None:
    """Raise LockedError when another process (ours or QEMU) has ``path`` open for writing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # unreadable: nobody we could ask; the rename still works on the directory entry
    try:
        if writer_lock_held(fd):
            raise LockedError("in use by another process (open for writing); not replacing it", path=path)
    finally:
        os.close(fd)


def create_exclusive(target: str) -> tuple[str, int]:
    """Create a new empty temporary next to ``target``, never through an existing name or symlink."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = f"{target}.{secrets.token_hex(4)}.part"
        try:
            return tmp, os.open(tmp, flags, 0o644)
        except FileExistsError:
            continue
        except OSError as exc:
            raise VhdxError(f"cannot create a temporary file: {exc.strerror}", path=tmp) from None
    raise VhdxError("cannot create a temporary file (every name tried exists)", path=target)


@contextlib.contextmanager
def staged(destination: Destination) -> Iterator[tuple[str, int]]:
    """Yield (temporary path, descriptor) for a regular-file output; rename it over the target on success.

    The descriptor is closed here. Whatever fails (the body, the rename), the temporary is removed.
    """
    tmp, fd = create_exclusive(destination.target)
    try:
        try:
            yield tmp, fd
        finally:
            os.close(fd)
        if destination.kind == REGULAR:
            refuse_if_being_written(destination.target)  # again: a writer may have come while we built
        try:
            os.replace(tmp, destination.target)
        except OSError as exc:
            raise VhdxError(f"cannot create: {exc.strerror}", path=destination.target) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def chain_identities(image) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of every layer of an open image's chain (what an output must never be)."""
    try:
        layers = image.layers
    except ChainError:
        layers = image.layers_opened()  # a broken chain still has the layers it could open
    out = []
    for layer in layers:
        if layer.io.fd is not None:
            st = os.fstat(layer.io.fd)
            out.append((st.st_dev, st.st_ino))
    return out


def open_in_place(destination: Destination) -> int:
    """Open a device or FIFO for writing where it is (no create, no truncate)."""
    flags = os.O_WRONLY | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(destination.target, flags)
    except OSError as exc:
        raise VhdxError(f"cannot open for writing: {exc.strerror}", path=destination.path) from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != destination.identity:
        os.close(fd)
        raise VhdxError("changed while being opened; not writing to it", path=destination.path)
    return fd
