"""An opened VHDX/AVHDX file and the virtual disk it presents through its whole chain.

Opening loads the file's structures with ``VhdxFile.load`` (vhdx/structures/file.py, the one load sequence);
the BAT is read in windows as reads need it. The parent of a differencing disk is opened only when a read
needs it.

References: [MS-VHDX] §2.2-§2.6; §2.3.3 note <5> (in-memory replay on read-only opens).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io as _io
import os
from functools import cached_property
from typing import TYPE_CHECKING

from vhdx.disk import chain as _chain
from vhdx.disk.extents import (
    ExtentKind,
    Extents,
    bitmap_runs,
    clip,
    coalesce,
    concat_sorted,
    kinds_of_states,
    overlay_stack,
)
from vhdx.errors import ChainLoopError, InvalidRequestError, VhdxError
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.lazy import np
from vhdx.structures.file import VhdxFile, foreign_file_reason  # noqa: F401 - foreign_file_reason: re-exported
from vhdx.structures.metadata import DiskParameters

if TYPE_CHECKING:  # imported where used: read-only opens need neither (start-up cost, issue 15)
    from vhdx.disk.supply import SupplyIndex
    from vhdx.disk.writer import Writer

# Blocks examined per step when walking a whole disk: bounds memory for 64 TiB disks with 1 MiB blocks.
WINDOW_BLOCKS = 1 << 18
# Requests up to this size first try the per-block short path (random I/O through deep chains).
SMALL_READ = 1 << 20
# Source of zeros for short runs (cheaper than wrapping the caller's buffer in an array).
_ZEROS = memoryview(bytes(64 << 10))
# Sector bitmap blocks (1 MiB each) kept per read-only file.
BITMAP_CACHE_CHUNKS = 32


class VhdxImage(VhdxFile):
    """One VHDX file, read-only by default; ``read`` and ``stream`` see the virtual disk through its chain.

    A ``VhdxFile`` (its structures, loaded by ``VhdxFile.load``) plus its parent and the reads.
    """

    def __init__(self, image_io: ImageIO, options: _chain.OpenOptions | None = None, *, _lineage=()) -> None:
        self.io = image_io
        self.options = options or _chain.OpenOptions()
        self._parent: VhdxImage | None = None
        self._parent_source: str | None = None
        self._writer: Writer | None = None
        self._bitmap_cache: dict[int, np.ndarray] = {}
        self._supply: SupplyIndex | None = None
        self._supply_layers: list[VhdxImage] = [self]
        try:
            self._adopt(VhdxFile.load(image_io, salvage=self.options.salvage))
            self._identity = self._file_identity()
            if self._identity is not None and self._identity in _lineage:
                raise ChainLoopError("the chain refers back to this file (loop)", structure="Parent Locator")
            self._lineage = (*_lineage, self._identity)
            if len(self._lineage) > self.options.depth_limit:
                raise _chain.too_deep(self.options.depth_limit, structure="Parent Locator")
        except VhdxError as exc:
            self.io.close()
            raise exc.with_path(self.io.path) from None
        except BaseException:
            self.io.close()
            raise

    # --- loading ------------------------------------------------------------------------------------
    def _adopt(self, loaded: VhdxFile) -> None:
        for f in dataclasses.fields(VhdxFile):
            setattr(self, f.name, getattr(loaded, f.name))

    def reload(self) -> None:
        """Load the structures again from the file (after a session of writes was committed and closed)."""
        self._bitmap_cache.clear()
        self._adopt(VhdxFile.load(self.io, salvage=self.options.salvage))

    def _file_identity(self):
        if self.io.fd is None:
            return None
        st = os.fstat(self.io.fd)
        return (st.st_dev, st.st_ino)

    # --- chain --------------------------------------------------------------------------------------
    @property
    def parent(self) -> VhdxImage | None:
        """The parent image, opened on first use; None for base disks and orphan opens."""
        if not self.has_parent or self.options.orphan:
            return None
        if self._parent is None:
            def open_candidate(path, options):
                return VhdxImage(ImageIO.open(path), options, _lineage=self._lineage)

            self._parent, cand = _chain.locate_and_open_parent(self, self.options, open_candidate)
            self._parent_source = cand.source
        return self._parent

    @property
    def parent_source(self) -> str | None:
        """Which locator entry (or fallback) found the parent, once it is open."""
        return self._parent_source

    @property
    def layers(self) -> list[VhdxImage]:
        """This image and all its ancestors, child first (opens them all)."""
        out, image = [], self
        while image is not None:
            out.append(image)
            image = image.parent
        return out

    def layers_opened(self) -> list[VhdxImage]:
        """This image and the ancestors opened so far (opens nothing)."""
        out, image = [self], self
        while image._parent is not None:
            image = image._parent
            out.append(image)
        return out

    @property
    def depth(self) -> int:
        return len(self._lineage)

    # --- extents ------------------------------------------------------------------------------------
    def _check_range(self, start: int, end: int) -> None:
        if start < 0 or end < start or end > self.virtual_size:
            raise InvalidRequestError(f"range [{start}, {end}) is outside the virtual disk ({self.virtual_size} bytes)")

    def _chunk_bitmap(self, chunk: int) -> np.ndarray | None:
        """The whole 1 MiB sector bitmap block of a chunk, cached while the file cannot change under us."""
        if self.io.writable:
            return None  # a writer changes bitmaps through the overlay: always read them afresh
        cached = self._bitmap_cache.get(chunk)
        if cached is None:
            offset = int(self.bat.bitmap_range(chunk, chunk + 1)[1][0])
            # Only the bytes of blocks the disk has (a small disk uses a sliver of its 1 MiB bitmap block),
            # read straight into the array.
            g = self.geometry
            blocks = min(g.chunk_ratio, g.data_blocks - chunk * g.chunk_ratio)
            cached = np.empty(blocks * g.bitmap_bytes_per_block, dtype=np.uint8)
            self.io.readinto_at(offset, cached)
            if len(self._bitmap_cache) >= BITMAP_CACHE_CHUNKS:
                self._bitmap_cache.pop(next(iter(self._bitmap_cache)))
            self._bitmap_cache[chunk] = cached
        return cached

    def _bitmap_bytes(self, chunk: int, first_byte: int, length: int) -> np.ndarray:
        """``length`` bytes of a chunk's sector bitmap from ``first_byte``."""
        cached = self._chunk_bitmap(chunk)
        if cached is not None:
            return cached[first_byte : first_byte + length]
        offset = int(self.bat.bitmap_range(chunk, chunk + 1)[1][0]) + first_byte
        return np.frombuffer(self.io.read_at(offset, length), dtype=np.uint8)

    def read_bitmap_bits(self, blocks: np.ndarray) -> np.ndarray:
        """Sector bitmap bits (blocks, sectors_per_block) of the given payload blocks, LSB-first per byte."""
        g = self.geometry
        per = g.bitmap_bytes_per_block
        ratio = g.chunk_ratio
        chunks = blocks // ratio
        raw = np.zeros((len(blocks), per), dtype=np.uint8)
        # One read per chunk (4 GiB or more of virtual disk), never one per block.
        for chunk in np.unique(chunks):
            sel = np.flatnonzero(chunks == chunk)
            within = blocks[sel] % ratio
            first, last = int(within.min()), int(within.max())
            if self.bat.bitmap_range(int(chunk), int(chunk) + 1)[0][0] != c.SbState.PRESENT:
                continue
            data = self._bitmap_bytes(int(chunk), first * per, (last - first + 1) * per)
            raw[sel] = data.reshape(-1, per)[within - first]
        return np.unpackbits(raw, axis=1, bitorder="little")

    def _sector_bits(self, block: int, first_sector: int, end_sector: int) -> np.ndarray:
        """Bitmap bits of sectors [first_sector, end_sector) of one partially present block."""
        g = self.geometry
        first_bit = (block % g.chunk_ratio) * g.sectors_per_block + first_sector
        end_bit = first_bit + end_sector - first_sector
        lo = first_bit // 8
        raw = self._bitmap_bytes(block // g.chunk_ratio, lo, -(-end_bit // 8) - lo)
        return np.unpackbits(raw, bitorder="little")[first_bit - lo * 8 : end_bit - lo * 8]

    def layer_extents(self, start: int, end: int) -> Extents:
        """Extents of [start, end) as this file alone describes them (layer 0; ABSENT = not in this file)."""
        self._check_range(start, end)
        if end == start:
            return Extents.empty()
        g = self.geometry
        bs = g.block_size
        b0, b1 = start // bs, (end - 1) // bs + 1
        uniform = self.bat.uniform_state(b0, b1)
        kind = kinds_of_states(np.array([uniform or 0], dtype=np.uint8))
        if uniform is not None and kind[0] in (ExtentKind.ABSENT, ExtentKind.ZERO):  # one run, no per-block arrays
            ext = Extents(np.array([start], np.int64), np.array([end - start], np.int64), kind,
                          np.zeros(1, np.int16), np.full(1, -1, np.int64))
            return ext.with_layer(0)
        states, offsets = self.bat.payload_range(b0, b1)
        kinds = kinds_of_states(states)
        partial = states == c.BatState.PARTIALLY_PRESENT
        # One extent per run of whole blocks that read alike (same kind; DATA contiguous in the file), not one
        # per block: a window of a sparse 64 TiB disk then costs a few extents.
        cut = np.ones(b1 - b0, dtype=bool)
        cut[1:] = ((kinds[1:] != kinds[:-1]) | partial[1:] | partial[:-1]
                   | ((kinds[1:] == ExtentKind.DATA) & (offsets[1:] != offsets[:-1] + bs)))
        firsts = np.flatnonzero(cut)
        lasts = np.append(firsts[1:], b1 - b0)
        whole = ~partial[firsts]
        firsts, lasts = firsts[whole], lasts[whole]
        rstart = (firsts + b0) * bs
        rlen = np.minimum((lasts + b0) * bs, g.virtual_size) - rstart
        fo = np.where(kinds[firsts] == ExtentKind.DATA, offsets[firsts], -1)
        parts = [Extents(rstart, rlen, kinds[firsts], np.full(len(firsts), -1, np.int16), fo)]
        if partial.any():
            blocks = np.flatnonzero(partial) + b0
            bits = self.read_bitmap_bits(blocks)
            parts.append(bitmap_runs(bits, blocks * bs, offsets[partial], g.logical_sector_size))
        ext = concat_sorted(parts).with_layer(0)
        return coalesce(clip(ext, start, end))

    def extents(self, start: int = 0, end: int | None = None, *, through_parents: bool = True) -> Extents:
        """Extents of [start, end) through the chain: ``layer`` is the depth that supplies each run.

        ABSENT runs that remain are not held by any layer and read as zeros. With ``through_parents`` False
        only this file is described (its ABSENT runs are what a parent would supply).
        """
        end = self.virtual_size if end is None else end
        step = self._chain_extents if through_parents else self.layer_extents
        parts = []
        window = WINDOW_BLOCKS * self.block_size
        for lo in range(start, end, window):
            parts.append(step(lo, min(end, lo + window)))
        if len(parts) == 1:
            return parts[0]
        return coalesce(concat_sorted(parts)) if parts else Extents.empty()

    def _chain_extents(self, start: int, end: int) -> Extents:
        # Down the chain while a layer leaves runs absent, then overlaid back up: a loop, not one call per layer.
        stack: list[Extents] = []
        image, lo, hi = self, start, end
        while True:
            ext = image.layer_extents(lo, hi)
            stack.append(ext)
            absent = ext.kind == ExtentKind.ABSENT
            parent = image.parent if absent.any() else None
            if parent is None:
                break
            lo = int(ext.start[absent][0])
            hi = min(int(ext.end[absent][-1]), parent.virtual_size)
            if hi <= lo:
                break
            image = parent
        return overlay_stack(stack)

    # --- reading ------------------------------------------------------------------------------------
    def readinto(self, offset: int, buf) -> int:
        """Fill ``buf`` with virtual disk bytes from ``offset``; returns the count (short only at the end)."""
        view = memoryview(buf).cast("B")
        if offset < 0:
            raise InvalidRequestError(f"negative offset {offset}")
        n = max(0, min(len(view), self.virtual_size - offset))
        if n == 0:
            return 0
        if not self.io.writable:
            # Nothing changes the chain under a read-only open: resolve through the cached supply index.
            try:
                runs = self.supply.lookup(offset, offset + n)
            except VhdxError:
                # A window reaches what this request may not (a missing parent under a range the child holds):
                # the per-request paths below fail only if the request itself needs it.
                runs = None
            if runs is not None:
                self._read_runs(offset, view[:n], runs)
                return n
        if n <= SMALL_READ and self._read_within_one_block(offset, view[:n]):
            return n
        self._read_overlaid(offset, view[:n])
        return n

    def _read_overlaid(self, offset: int, view: memoryview) -> None:
        """Reference read path: the extent overlay of every layer, recomputed for this request."""
        layers = [self]
        target = np.frombuffer(view, dtype=np.uint8) if not view.readonly else None
        for start, length, kind, layer, file_offset in self.extents(offset, offset + len(view)).rows():
            lo = start - offset
            if kind == ExtentKind.DATA:
                while len(layers) <= layer:
                    layers.append(layers[-1].parent)
                layers[layer].io.readinto_at(file_offset, view[lo : lo + length])
            else:
                target[lo : lo + length] = 0

    @property
    def supply(self) -> SupplyIndex:
        """The cached map of which layer supplies each run of the disk (see ``vhdx.disk.supply``)."""
        if self._supply is None:
            from vhdx.disk.supply import SupplyIndex  # noqa: PLC0415 - only reads of data need it (start-up cost)

            self._supply = SupplyIndex(self._chain_extents, self.virtual_size, self.block_size)
        return self._supply

    def _supply_layer(self, depth: int) -> VhdxImage:
        layers = self._supply_layers
        while len(layers) <= depth:
            layers.append(layers[-1].parent)
        return layers[depth]

    def _read_runs(self, offset: int, view: memoryview, runs) -> None:
        """Fill ``view`` from resolved runs: one positional read per contiguous file run, zeros elsewhere."""
        target = None
        for start, length, kind, layer, file_offset in runs:
            lo = start - offset
            if kind == ExtentKind.DATA:
                self._supply_layer(layer).io.readinto_at(file_offset, view[lo : lo + length])
            elif length <= len(_ZEROS):
                view[lo : lo + length] = _ZEROS[:length]
            else:
                if target is None:
                    target = np.frombuffer(view, dtype=np.uint8)
                target[lo : lo + length] = 0

    def _read_within_one_block(self, offset: int, view: memoryview) -> bool:
        """Short path for a request inside one block of every layer: walk the BAT entries child to parent.

        Returns False (nothing read) whenever the request needs the general extent machinery: it crosses a
        block of some layer, goes past a parent's end, or meets a mixed run of bitmap bits.
        """
        image, n = self, len(view)
        while True:
            g = image.geometry
            if offset + n > g.virtual_size:
                return False
            block, in_block = divmod(offset, g.block_size)
            if in_block + n > g.block_size:
                return False
            states, offsets = image.bat.payload_range(block, block + 1)
            state = int(states[0])
            if state == c.BatState.PARTIALLY_PRESENT:
                lss = g.logical_sector_size
                bits = image._sector_bits(block, in_block // lss, -(-(in_block + n) // lss))
                if bits.all():
                    state = c.BatState.FULLY_PRESENT
                elif not bits.any():
                    state = c.BatState.NOT_PRESENT
                else:
                    return False
            if state == c.BatState.FULLY_PRESENT:
                image.io.readinto_at(int(offsets[0]) + in_block, view)
                return True
            if state == c.BatState.NOT_PRESENT and image.has_parent and not image.options.orphan:
                image = image.parent
                continue
            if state in c.ZERO_READING_STATES or state == c.BatState.NOT_PRESENT:
                view[:] = bytes(n)
                return True
            return False  # reserved states: let the general path report them

    def read(self, offset: int, length: int) -> bytes:
        """Read virtual disk bytes; the result is shorter than ``length`` only at the end of the disk."""
        if length < 0:
            raise InvalidRequestError(f"negative length {length}")
        n = max(0, min(length, self.virtual_size - offset))
        buf = bytearray(n)
        self.readinto(offset, buf)
        return bytes(buf)

    def stream(self) -> VirtualDiskStream:
        """A seekable, read-only file object over the virtual disk."""
        return VirtualDiskStream(self)

    @cached_property
    def allocated_bytes(self) -> int:
        """Bytes of the file owned by payload and sector bitmap blocks of this file."""
        summary = self.bat.summary
        blocks = summary.allocated_blocks * self.block_size
        bitmaps = summary.bitmaps_present * c.SECTOR_BITMAP_BLOCK_SIZE
        return blocks + bitmaps if self.has_parent else blocks

    # --- writing ------------------------------------------------------------------------------------
    @property
    def writer(self) -> Writer:
        """Write state of a writable open (created on first use)."""
        if not self.io.writable:
            raise VhdxError("image is open read-only (open it with writable=True)", path=self.path)
        if self._writer is None:
            from vhdx.disk.writer import Writer  # noqa: PLC0415 - writable opens only (start-up cost of reads)

            self._writer = Writer(self)
        return self._writer

    def write(self, offset: int, data) -> int:
        """Write bytes at a virtual offset. Metadata becomes durable at ``flush`` or ``close``."""
        return self.writer.write(offset, data)

    def write_zeros(self, offset: int, length: int) -> None:
        """Make a range read as zeros (whole blocks become ZERO where the disk type allows it)."""
        self.writer.write_zeros(offset, length)

    def discard(self, offset: int, length: int) -> int:
        """Trim whole blocks inside the range (they read as zeros); returns the bytes unmapped (see Writer.discard)."""
        return self.writer.discard(offset, length)

    def flush(self) -> None:
        """Commit pending metadata through the log and flush the file."""
        if self._writer is not None:
            self._writer.commit()

    def end_write_session(self) -> None:
        """Commit and empty the log, then read the structures again (a layout change moved them).

        The next write starts a new session (new FileWriteGuid) on the structures as the file now has them.
        """
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.reload()

    # --- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Commit (for writable opens: the log is left empty), then close the chain's files."""
        try:
            if self._writer is not None and not self.io.closed:
                self._writer.close()
        finally:
            self._writer = None
            parent, self._parent = self._parent, None
            self.io.close()
            # Ancestors are closed in a loop: a 1024-layer chain must not recurse.
            while parent is not None:
                ancestor, parent._parent = parent._parent, None
                parent.close()  # its own parent is detached: no recursion
                parent = ancestor

    def __enter__(self) -> VhdxImage:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._writer is not None and not self.io.closed:
            # A failed block must not commit half of its work: staged metadata is dropped, not written.
            writer, self._writer = self._writer, None
            # Any abort failure is dropped: the file stays as a crash here would leave it; the first error wins.
            with contextlib.suppress(Exception):
                writer.abort()
        self.close()

    def __repr__(self) -> str:
        return f"<VhdxImage {self.path!r} {self.disk_type.label} {self.virtual_size} bytes>"


class VirtualDiskStream(_io.RawIOBase):
    """Read-only, seekable raw view of a virtual disk (its whole chain)."""

    def __init__(self, image: VhdxImage) -> None:
        super().__init__()
        self._image = image
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def readinto(self, buf) -> int:
        n = self._image.readinto(self._pos, buf)
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = _io.SEEK_SET) -> int:
        base = {_io.SEEK_SET: 0, _io.SEEK_CUR: self._pos, _io.SEEK_END: self._image.virtual_size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    @property
    def size(self) -> int:
        return self._image.virtual_size


def read_disk_parameters(path) -> DiskParameters:
    """A file's metadata (headers, log view, regions, metadata items) without loading its BAT.

    For scanning folders of disks (which children point at which parent): a 64 TiB disk's BAT is hundreds of
    MiB, its metadata a few KiB.
    """
    return read_structures(path).metadata.params


def read_structures(path) -> VhdxFile:
    """A file's identifier, headers, log state, regions and metadata, without its BAT; the file is closed again.

    The result answers ``creator``, ``headers``, ``log``, ``regions``, ``metadata`` and the properties built on
    them (``disk_type``, ``data_write_guid``...); its ``bat`` is None.
    """
    io = ImageIO.open(path)
    try:
        return VhdxFile.load(io, bat=False)
    finally:
        io.close()


def open_image(source, *, writable: bool = False, parent: str | None = None, search_dirs=(),
               ignore_id_mismatch: bool = False, orphan: bool = False, force: bool = False,
               salvage: bool = False) -> VhdxImage:
    """Open a VHDX/AVHDX file (read-only by default).

    Args:
        source: a path or a seekable binary file object.
        writable: open for writing (takes the exclusive writer lock).
        parent: explicit path of the parent (overrides the parent locator of this file).
        search_dirs: folders to search for parents by file name.
        ignore_id_mismatch: accept a parent whose DataWriteGuid does not match the linkage.
        orphan: read a differencing disk alone; what it does not hold reads as zeros.
        force: write even though differencing disks (in this file's folder or ``search_dirs``) depend on it;
            without it the first write that would change its data raises ``DependentsError``, as Hyper-V
            refuses to open such a parent for writing.
        salvage: read payload a truncated file lacks as zeros instead of refusing it; each layer's ``invented``
            lists the virtual ranges so filled (read-only opens only).
    """
    if salvage and writable:
        raise InvalidRequestError("salvage is for reading; a truncated file is not opened for writing")
    options = _chain.OpenOptions(parent=os.fspath(parent) if parent else None,
                                 search_dirs=tuple(os.fspath(d) for d in search_dirs),
                                 ignore_id_mismatch=ignore_id_mismatch, orphan=orphan, force=force,
                                 salvage=salvage)
    if isinstance(source, ImageIO):
        image_io = source
    elif isinstance(source, (str, bytes, os.PathLike)):
        image_io = ImageIO.open(source, writable=writable)
    else:
        image_io = ImageIO.wrap(source, writable=writable)
    return VhdxImage(image_io, options)
