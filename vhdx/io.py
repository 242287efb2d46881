"""The one file-access layer: positional reads and writes, layout parsing, locking, an in-memory overlay.

Nothing outside this module relies on a file cursor or calls ``parse``: every access names its offset, so
an error can always say where it happened.

References: [MS-VHDX] §2.3.3 (in-memory replay of a log on read-only opens, product note <5>).
"""

from __future__ import annotations

import bisect
import copy
import errno
import fcntl
import functools
import os
import stat
import struct
import threading
from dataclasses import dataclass, field
from io import BytesIO as _BytesIO
from typing import Any, BinaryIO, cast

from construct import ConstructError, Container

from vhdx.errors import FormatError, VhdxError
from vhdx.format import layouts
from vhdx.locks import take_writer_lock, writer_lock_held


@dataclass
class Overlay:
    """Sectors replayed from a log in memory: later reads see them instead of the file's bytes.

    Attributes:
        sectors: 4 KiB-aligned file offset -> 4096 bytes.
        zeros: (offset, length) ranges that read as zero.
        file_size: the file size after replay (a replay may extend the file).
    """

    sectors: dict[int, bytes] = field(default_factory=dict)
    zeros: list[tuple[int, int]] = field(default_factory=list)
    file_size: int = 0

    def __post_init__(self) -> None:
        self._keys = sorted(self.sectors)

    def set_sector(self, offset: int, data: bytes) -> None:
        """Add or replace one sector image (a writer's pending metadata)."""
        if offset not in self.sectors:
            bisect.insort(self._keys, offset)
        self.sectors[offset] = data

    def drop_sectors(self, offsets) -> None:
        for offset in offsets:
            if self.sectors.pop(offset, None) is not None:
                self._keys.remove(offset)

    def touches(self, offset: int, length: int) -> bool:
        """True when any replayed sector or zero range meets [offset, offset+length)."""
        end = offset + length
        if any(zoff < end and offset < zoff + zlen for zoff, zlen in self.zeros):
            return True
        i = bisect.bisect_left(self._keys, offset - 4096 + 1)
        return i < len(self._keys) and self._keys[i] < end

    def patch(self, offset: int, buf: memoryview) -> None:
        """Apply the overlay to ``buf``, which holds the file's bytes from ``offset``."""
        end = offset + len(buf)
        # Zero ranges first, then data sectors: a log applies its descriptors in order, and the replay plan
        # already folded later data over earlier zeros (see log.plan_replay).
        for zoff, zlen in self.zeros:
            lo, hi = max(offset, zoff), min(end, zoff + zlen)
            if lo < hi:
                buf[lo - offset : hi - offset] = bytes(hi - lo)
        sector = 4096  # every image is one 4 KiB sector (log sectors and a writer's staged sectors alike)
        start = bisect.bisect_left(self._keys, offset - sector + 1)
        for key in self._keys[start:]:
            if key >= end:
                break
            data = self.sectors[key]
            lo, hi = max(offset, key), min(end, key + len(data))
            buf[lo - offset : hi - offset] = data[lo - key : hi - key]


class ImageIO:
    """Positional access to one image file.

    Opened from a path, it owns the descriptor and opens read-only with ``O_RDONLY`` unless asked to write;
    a writable open takes an exclusive advisory lock. It can also wrap any seekable binary file object.
    """

    def __init__(self, fd: int | None, fileobj: BinaryIO | None, *, path: str, writable: bool, owns: bool) -> None:
        self._fd = fd
        # A seekable binary file object (BinaryIO declares no readinto); None only when _fd is set, and every
        # use checks _fd first.
        self._fileobj: Any = fileobj
        self.path = path
        self.writable = writable
        self._owns = owns
        self.overlay: Overlay | None = None
        self._size: int | None = None  # st_size of a read-only file we own, taken once (fstat is not free)
        # False for scratch files (a `.part` being built): crash consistency is moot there, so flush()
        # only orders nothing and costs nothing; the builder syncs once at the end if asked.
        self.durable = True
        self._may_clone = True  # False once the file system said it cannot share extents

    # --- opening ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, writable: bool = False, lock: bool = True) -> ImageIO:
        """Open a regular file; anything else (FIFO, device, directory, dangling link) is refused at once."""
        path = os.fspath(path)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise VhdxError(f"cannot open: {exc.strerror}", path=path) from None
        if not stat.S_ISREG(st.st_mode):
            raise VhdxError("not a regular file", path=path)
        # O_NONBLOCK: if the path was swapped for a FIFO after the stat, the open still returns at once.
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        flags |= getattr(os, "O_NOCTTY", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise VhdxError(f"cannot open: {exc.strerror}", path=path) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise VhdxError("not a regular file", path=path)
        os.set_blocking(fd, True)
        image_io = cls(fd, None, path=path, writable=writable, owns=True)
        if writable and lock:
            try:
                take_writer_lock(fd)
            except VhdxError as exc:
                os.close(fd)
                raise exc.with_path(path) from None
        return image_io

    @classmethod
    def wrap(cls, fileobj: BinaryIO, *, writable: bool = False) -> ImageIO:
        """Use an already open binary file object (the caller keeps ownership)."""
        name = str(getattr(fileobj, "name", "<stream>"))
        try:
            fd = fileobj.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None
        if fd is not None:
            return cls(fd, None, path=name, writable=writable, owns=False)
        return cls(None, fileobj, path=name, writable=writable, owns=False)

    def borrow(self) -> ImageIO:
        """Another handle on this open file: same descriptor, so same locks; closing it leaves the file open.

        A merge keeps every file it changes open (and locked) from planning to the end and opens images on
        borrowed handles, since a second descriptor of its own would be refused the lock it holds.
        """
        twin = copy.copy(self)
        twin._owns = False
        twin._size = None
        twin.overlay = None
        return twin

    def close(self) -> None:
        if self._owns and self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._fileobj = None

    @property
    def closed(self) -> bool:
        return self._fd is None and self._fileobj is None

    @property
    def concurrent_reads(self) -> bool:
        """True when threads may read at once: positional reads of a descriptor (a stream reads by seeking)."""
        return self._fd is not None

    @property
    def fd(self) -> int | None:
        """The OS file descriptor, for copy_file_range and friends; None for pure Python streams."""
        return self._fd

    def writer_lock_held(self) -> bool:
        """True when another process holds a writer lock, ours or QEMU's (read-only opens only ask, never block)."""
        # A writable open holds the locks itself (and asking with flock would convert its own lock).
        return self._fd is not None and not self.writable and writer_lock_held(self._fd)

    # --- size ---------------------------------------------------------------------------------------
    @property
    def real_size(self) -> int:
        """Size of the file on disk."""
        if self._fd is not None:
            if self._size is not None:
                return self._size
            size = os.fstat(self._fd).st_size
            # Only a read-only descriptor of our own keeps its size: writers (and callers' files) change it.
            if self._owns and not self.writable:
                self._size = size
            return size
        return self._fileobj.seek(0, os.SEEK_END)

    @property
    def size(self) -> int:
        """Size as readers must see it: the file's, or larger after an in-memory log replay."""
        size = self.real_size
        if self.overlay is not None:
            size = max(size, self.overlay.file_size)
        return size

    # --- reading ------------------------------------------------------------------------------------
    def _pread_into(self, offset: int, view: memoryview) -> int:
        if self._fd is not None:
            done = 0
            while done < len(view):
                try:
                    n = os.preadv(self._fd, [view[done:]], offset + done)
                except OSError as exc:
                    raise VhdxError(f"read failed: {exc.strerror}", path=self.path, offset=offset + done) from None
                if n == 0:
                    break
                done += n
            return done
        self._fileobj.seek(offset)
        return self._fileobj.readinto(view) or 0

    def readinto_at(self, offset: int, buf) -> int:
        """Fill ``buf`` from ``offset``; bytes past the end of file read as zero. Returns bytes read from file."""
        view = memoryview(buf).cast("B")
        if offset < 0:
            raise FormatError("negative file offset", offset=offset, path=self.path)
        got = self._pread_into(offset, view) if offset < self.real_size else 0
        if got < len(view):
            view[got:] = bytes(len(view) - got)
        if self.overlay is not None:
            self.overlay.patch(offset, view)
            got = max(got, min(len(view), self.size - offset))
        return got

    def read_pieces(self, view: memoryview, pieces) -> None:
        """``readinto_at`` for many ``(lo, hi, file offset)`` pieces of ``view``, with little work per piece.

        A flatten of a fragmented chain reads thousands of 4 KiB pieces: each is one ``preadv`` here, and only a
        piece that reads short or fails (the end of the file, an error to report) or a file seen through a log
        replay takes the whole ``readinto_at`` path.
        """
        fd = self._fd if self.overlay is None else None
        for lo, hi, file_offset in pieces:
            piece = view[lo:hi]
            if fd is not None:
                try:
                    if os.preadv(fd, [piece], file_offset) == hi - lo:
                        continue
                except OSError:
                    pass  # readinto_at reads it again and names the error
            self.readinto_at(file_offset, piece)

    def readinto_data_at(self, offset: int, buf) -> None:
        """``readinto_at``, reading only the parts that hold data (``data_spans``): holes are zeroed, not read.

        Reading a hole of a 64 TiB disk's BAT region would fill the page cache with pages of zeros.
        """
        view = memoryview(buf).cast("B")
        done = 0  # only the holes between data spans are zeroed: a range without holes is written once, not twice
        for start, stop in self.data_spans(offset, len(view)):
            view[done : start - offset] = bytes(start - offset - done)
            self.readinto_at(start, view[start - offset : stop - offset])
            done = stop - offset
        view[done:] = bytes(len(view) - done)

    def read_at(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``; what lies past the end of file reads as zero."""
        if self._fd is not None and self.overlay is None and offset >= 0 and length > 0:
            # The usual whole read: one buffer, filled once (no zeroed bytearray copied into bytes).
            try:
                data = os.pread(self._fd, length, offset)
            except OSError:
                data = b""  # the careful path below reads again and names the error
            if len(data) == length:
                return data
        buf = bytearray(length)
        self.readinto_at(offset, buf)
        return bytes(buf)

    def data_spans(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The parts of [offset, offset + length) that may hold non-zero bytes; the rest are holes (zeros).

        Asks the file system with ``SEEK_DATA``/``SEEK_HOLE`` (a sparse 64 TiB BAT is mostly holes). Where it
        cannot answer, for streams, and where an overlay touches the range, the whole range is returned.
        """
        end = offset + length
        if length <= 0:
            return []
        if self._fd is None or not hasattr(os, "SEEK_DATA") or (
                self.overlay is not None and self.overlay.touches(offset, length)):
            return [(offset, end)]
        spans, pos = [], offset
        try:
            while pos < end:
                try:
                    start = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no data at or after pos
                        break
                    raise
                if start >= end:
                    break
                stop = min(os.lseek(self._fd, start, os.SEEK_HOLE), end)
                spans.append((start, stop))
                pos = stop
        except OSError:  # the file system does not answer: read everything
            return [(offset, end)]
        return spans

    def read_file_at(self, offset: int, length: int) -> bytes:
        """The file's own bytes, without the overlay (the log an overlay is read from); zeros past the end."""
        buf = bytearray(length)
        if 0 <= offset < self.real_size:
            self._pread_into(offset, memoryview(buf))
        return bytes(buf)

    def read_exact_at(self, offset: int, length: int, structure: str) -> bytes:
        """Read a structure that must lie entirely inside the file."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FormatError(
                f"{length} bytes needed but the file ends at {self.size:#x} (truncated?)",
                structure=structure,
                offset=offset,
                path=self.path,
                code="FILE_TRUNCATED",
            )
        return self.read_at(offset, length)

    def read_layout(self, layout, offset: int, structure: str | None = None):
        """Parse ``layout`` at ``offset``: the single place where construct's parse is called."""
        name = structure or layouts.layout_name(layout)
        data = self.read_exact_at(offset, _sizeof(layout), name)
        return parse_bytes(layout, data, offset=offset, structure=name, path=self.path)

    # --- writing ------------------------------------------------------------------------------------
    def _require_writable(self) -> None:
        if not self.writable:
            raise VhdxError("image is open read-only", path=self.path)

    def write_at(self, offset: int, data) -> None:
        """Write all of ``data`` at ``offset``."""
        self._require_writable()
        view = memoryview(data).cast("B")
        if self._fd is not None:
            done = 0
            while done < len(view):
                try:
                    done += os.pwritev(self._fd, [view[done:]], offset + done)
                except OSError as exc:
                    raise VhdxError(f"write failed: {exc.strerror}", path=self.path, offset=offset + done) from None
            return
        self._fileobj.seek(offset)
        self._fileobj.write(view)

    def zero_range(self, offset: int, length: int) -> None:
        """Make [offset, offset + length) read as zeros, the file growing to cover it if it ends before.

        A hole is punched where the file system can (no bytes written, the space given back: a grown 64 TiB BAT
        must not cost 512 MiB of zeros on disk); elsewhere zeros are written. Callers zero only space nothing
        references yet (or any more), so either way a crash in the middle leaves nothing half-valid.
        """
        self._require_writable()
        end = offset + length
        if length <= 0:
            return
        size = self.real_size
        if self._fd is not None and (offset >= size or _punch_hole(self._fd, offset, min(end, size) - offset)):
            if end > size:
                self.truncate(end)  # the new part is a hole already
            return
        self.write_zeros(offset, length)

    def write_zeros(self, offset: int, length: int) -> None:
        """Write ``length`` zero bytes at ``offset`` (one write per ``COPY_CHUNK``, from ``zero_pages``)."""
        zeros = zero_pages()
        for pos in range(offset, offset + length, len(zeros)):
            self.write_at(pos, zeros[: min(len(zeros), offset + length - pos)])

    def truncate(self, size: int) -> None:
        self._require_writable()
        try:
            if self._fd is not None:
                os.ftruncate(self._fd, size)
            else:
                self._fileobj.truncate(size)
        except OSError as exc:
            raise VhdxError(f"cannot resize file: {exc.strerror}", path=self.path) from None

    def flush(self) -> None:
        """Make everything written so far durable (fsync)."""
        if not self.writable or not self.durable:
            return
        try:
            if self._fd is not None:
                os.fsync(self._fd)
            else:
                self._fileobj.flush()
        except OSError as exc:
            raise VhdxError(f"flush failed: {exc.strerror}", path=self.path) from None

    # --- copying between files ----------------------------------------------------------------------
    def copy_from(self, src: ImageIO, src_offset: int, offset: int, length: int,
                  buf: bytearray | None = None) -> int:
        """Copy ``length`` bytes of ``src`` at ``src_offset`` to ``offset`` here; returns the bytes shared.

        On a file system that shares extents (XFS with reflink, btrfs) whole ``CLONE_ALIGN``-aligned ranges
        are cloned (``FICLONERANGE``) instead of copied; anything else goes through the kernel's
        ``copy_file_range`` or, failing that, through ``buf``. Test doubles that count writes override this
        with ``copy_through_buffer``.
        """
        if self._fd is None:
            self.copy_through_buffer(src, src_offset, offset, length, buf)
            return 0
        self._require_writable()
        shared = 0
        if self._may_clone and length >= CLONE_ALIGN and not (src_offset | offset | length) % CLONE_ALIGN:
            shared = self._clone_from(src, src_offset, offset, length)
        if shared < length:
            try:
                copy_range(src, src_offset + shared, self._fd, offset + shared, length - shared, buf)
            except VhdxError as exc:
                raise exc.with_path(self.path) from None
        return shared

    def _clone_from(self, src: ImageIO, src_offset: int, offset: int, length: int) -> int:
        """Share whole extents of ``src`` (nothing when the file system cannot: it is asked once per handle)."""
        overlaid = src.overlay is not None and src.overlay.touches(src_offset, length)
        if src.fd is None or overlaid or src_offset + length > src.real_size:
            return 0
        try:
            request = struct.pack(_CLONE_RANGE, src.fd, src_offset, length, offset)
            fcntl.ioctl(cast(int, self._fd), FICLONERANGE, request)
        except OSError as exc:
            if exc.errno in _CLONE_UNSUPPORTED:
                self._may_clone = False
            return 0  # any other refusal (e.g. ENOSPC for the new mapping) is retried as a plain copy
        return length

    def copy_through_buffer(self, src: ImageIO, src_offset: int, offset: int, length: int,
                            buf: bytearray | None = None) -> None:
        """Copy through a buffer with ``readinto_at`` and ``write_at`` (one write per ``COPY_CHUNK``)."""
        buf = buf if buf is not None and len(buf) >= min(COPY_CHUNK, length) else bytearray(COPY_CHUNK)
        view = memoryview(buf)
        done = 0
        while done < length:
            n = min(len(buf), length - done)
            src.readinto_at(src_offset + done, view[:n])
            self.write_at(offset + done, view[:n])
            done += n


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02  # linux/falloc.h


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate [offset, offset + length) of ``fd`` (it then reads as zeros); False where that is not possible."""
    fallocate = _libc_function("fallocate", "c_int", "c_int", "c_longlong", "c_longlong")
    if fallocate is None:
        return False
    return fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


_LIBC: dict = {}  # C library functions looked up once through ctypes (None: the library lacks it)


def _libc_function(name: str, *argtypes: str):
    """The C library's ``name`` with ctypes argument types named ``argtypes`` (returns int); None if it lacks it."""
    if name not in _LIBC:
        import ctypes  # noqa: PLC0415 - start-up cost: only bulk scans and synced copies call into libc

        try:
            function = getattr(ctypes.CDLL(None, use_errno=True), name)
            function.argtypes = [getattr(ctypes, t) for t in argtypes]
        except (AttributeError, OSError):
            function = None
        _LIBC[name] = function
    return _LIBC[name]


@functools.cache
def zero_pages() -> memoryview:
    """``COPY_CHUNK`` zero bytes, read-only, shared by every zero write of the process.

    An anonymous private read-only map: the kernel backs it with its one zero page, so it costs no memory and
    nothing is allocated and filled per call (a merge that zeroes a thousand 2 MiB runs wrote from a fresh
    ``bytes`` each time, about a fifth of the writes' own time).
    """
    import mmap  # noqa: PLC0415 - start-up cost: only writers zero ranges

    return memoryview(mmap.mmap(-1, COPY_CHUNK, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ))


def equal_bytes(a, b) -> bool:
    """True when two buffers hold the same bytes.

    Writable buffers (a read buffer, a template held in a bytearray) are compared with the C library's ``memcmp``
    through ctypes, which releases the GIL, so threads compare at once (``bytes ==`` holds it). Read-only
    buffers, or a C library without ``memcmp``, are compared by Python.
    """
    x, y = memoryview(a).cast("B"), memoryview(b).cast("B")
    if x.nbytes != y.nbytes:
        return False
    memcmp = _libc_function("memcmp", "c_void_p", "c_void_p", "c_size_t")
    if not x.nbytes or memcmp is None or x.readonly or y.readonly:
        # bytes compare in place; other views are copied (memoryview's own == goes byte by byte, far slower)
        return (a if type(a) is bytes else x.tobytes()) == (b if type(b) is bytes else y.tobytes())
    return memcmp(_address(x), _address(y), x.nbytes) == 0


def _address(view: memoryview) -> int:
    """Address of the first byte of a writable, non-empty buffer (for a C call)."""
    import ctypes  # noqa: PLC0415 - loaded by _libc_function before any caller gets here

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


# A layout parsed this often in one process is compiled (construct's compiler): each parse then costs a few
# times less, but compiling takes tens of milliseconds, which a one-file command must not pay and a scan of
# thousands of disks pays once.
COMPILE_AFTER = 32
_MAX_COUNTED = 256
_uses: dict[int, tuple[object, int]] = {}
_compiled: dict[int, object] = {}


_sizes: dict[int, tuple[object, int]] = {}


def _sizeof(layout) -> int:
    """``layout.sizeof()``, remembered per layout (construct walks the whole declaration each time)."""
    held = _sizes.get(id(layout))
    if held is not None and held[0] is layout:
        return held[1]
    size = layout.sizeof()
    if len(_sizes) < _MAX_COUNTED:
        _sizes[id(layout)] = (layout, size)
    return size


def _parser(layout):
    """The layout itself, or its compiled twin once it has been parsed ``COMPILE_AFTER`` times."""
    key = id(layout)
    compiled = _compiled.get(key)
    if compiled is not None:
        return compiled
    held, uses = _uses.get(key, (layout, 0))
    if held is not layout or (uses == 0 and len(_uses) >= _MAX_COUNTED):
        return layout  # an id reused by another object, or too many ad-hoc layouts to count
    _uses[key] = (layout, uses + 1)  # the layout is held, so its id stays its own
    if uses + 1 < COMPILE_AFTER:
        return layout
    try:
        compiled = _Direct(layout.compile().parsefunc)
    except Exception:  # construct cannot compile every layout: parse it as it is
        compiled = layout
    _compiled[key] = compiled
    return compiled


class _Direct:
    """A compiled parser called straight, without construct's per-call stream and report layers."""

    __slots__ = ("_parse",)

    def __init__(self, parsefunc) -> None:
        self._parse = parsefunc

    def parse(self, data: bytes):
        # The context construct's parse_stream would pass.
        context = Container(_parsing=True, _building=False, _sizing=False)
        context._params = context
        return self._parse(_BytesIO(data), context)


def parse_bytes(layout, data: bytes, *, offset: int | None = None, structure: str | None = None, path=None):
    """Parse bytes already read, turning construct's errors into FormatError with the offset."""
    try:
        try:
            return _parser(layout).parse(data)
        except Exception:  # whatever the compiled parser raised, the layout's own error is reported
            # Report what the layout itself says (the compiled parser words its errors differently).
            return layout.parse(data)
    except ConstructError as exc:
        detail = str(exc).splitlines()[-1] if str(exc) else type(exc).__name__
        raise FormatError(
            f"malformed ({detail})", structure=structure or layouts.layout_name(layout), offset=offset, path=path
        ) from None


COPY_CHUNK = 8 * 1024 * 1024
SMALL_COPY = 256 * 1024
# Extent sharing (reflink): FICLONERANGE = _IOW(0x94, 13, struct file_clone_range), whose fields are
# src_fd (s64), src_offset, src_length, dest_offset (u64). Only ranges aligned to 1 MiB (every VHDX payload
# block is) are cloned: that is a multiple of any file system's block size.
FICLONERANGE = 0x4020940D
_CLONE_RANGE = "qQQQ"
CLONE_ALIGN = 1024 * 1024
# The file system (or the pair of files) cannot share extents: stop asking on this handle.
_CLONE_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.EBADF, errno.ENOSYS,
                      errno.EPERM, errno.ETXTBSY}


def copy_range(src: ImageIO, src_offset: int, dst_fd: int, dst_offset: int, length: int,
               buf: bytearray | None = None) -> None:
    """Copy bytes from an image file to another descriptor, in the kernel when possible.

    ``os.copy_file_range`` is used unless the source has an in-memory overlay over the range or is not a
    real descriptor; bytes the source file does not have (past its end) arrive as zeros either way.
    """
    end_in_file = min(src_offset + length, src.real_size)
    overlaid = src.overlay is not None and src.overlay.touches(src_offset, length)
    done = 0
    # Below this size a kernel copy costs more in system-call set-up than it saves (many 4 KiB runs).
    worth_kernel_copy = length > SMALL_COPY
    if worth_kernel_copy and src.fd is not None and not overlaid and hasattr(os, "copy_file_range"):
        while src_offset + done < end_in_file:
            try:
                n = os.copy_file_range(src.fd, dst_fd, end_in_file - src_offset - done, src_offset + done,
                                       dst_offset + done)
            except OSError:
                break  # e.g. EXDEV on old kernels, or an fd type the kernel will not copy: use buffers
            if n == 0:
                break
            done += n
    if done < length:
        buf = buf if buf is not None and len(buf) >= min(COPY_CHUNK, length - done) else bytearray(COPY_CHUNK)
        view = memoryview(buf)
        while done < length:
            n = min(len(buf), length - done)
            src.readinto_at(src_offset + done, view[:n])
            try:
                os.pwrite(dst_fd, view[:n], dst_offset + done)
            except OSError as exc:  # e.g. ENOSPC on the destination
                raise VhdxError(f"write failed: {exc.strerror}", offset=dst_offset + done) from None
            done += n


_SYNC_FILE_RANGE_WRITE = 2  # start write-back of the dirty pages of the range; wait for nothing


def _sync_file_range():
    """Linux's ``sync_file_range`` (None where the C library has none)."""
    return _libc_function("sync_file_range", "c_int", "c_longlong", "c_longlong", "c_uint")


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from ``offset`` to storage, without waiting.

    A copy that ends with fsync then overlaps the write-back with its own work instead of waiting for all of
    it at the end. Durability still comes only from the caller's fsync, which also reports any I/O error; where
    Linux's ``sync_file_range`` is missing this does nothing.
    """
    call = _sync_file_range()
    if call is not None and length > 0:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class WriteBehind:
    """Start the write-back of what a copy has written on a helper thread, while the copy goes on.

    Submitting write-back costs the kernel real CPU time (block allocation, building requests); done in the
    copying thread it only moves the cost from the final fsync to the copy. On a helper thread (the call
    releases the GIL) it overlaps the copy, and the final fsync waits for little. Only that fsync makes the
    data durable and reports errors; this changes nothing the file will hold.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._target = 0  # end of what ``advance`` was told
        self._ranges: list[tuple[int, int]] = []  # written [lo, hi) whose write-back is not started yet
        self._stop = False
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def advance(self, end: int) -> None:
        """The bytes before ``end`` are written (a copy that writes the file in order): start their write-back."""
        with self._wake:
            if end > self._target:
                self._queue(self._target, end)
                self._target = end

    def wrote(self, offset: int, length: int) -> None:
        """``length`` bytes at ``offset`` are written (anywhere in the file): start their write-back."""
        with self._wake:
            self._queue(offset, offset + length)

    def _queue(self, lo: int, hi: int) -> None:
        if self._thread is not None:  # (without the kernel call nothing is queued)
            self._ranges.append((lo, hi))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._ranges and not self._stop:
                    self._wake.wait()
                if not self._ranges:
                    return
                todo, self._ranges = self._ranges, []
            lo, hi = todo[0]
            for a, b in todo[1:]:  # ranges that follow each other go to the kernel as one
                if a != hi:
                    start_writeback(self._fd, lo, hi - lo)
                    lo = a
                hi = b
            start_writeback(self._fd, lo, hi - lo)

    def __enter__(self) -> WriteBehind:
        if _sync_file_range() is not None:  # no helper thread where the kernel call is missing
            self._thread = threading.Thread(target=self._run, name="vhdx-write-behind", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
