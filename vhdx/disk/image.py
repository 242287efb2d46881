"""An opened VHDX/AVHDX file and the virtual disk it presents through its whole chain.

Opening reads, in this order: file identifier, both headers (current one chosen by CRC, version, sequence),
the log (a dirty log is replayed in memory for reading; nothing is written), both region tables, the
metadata, and the BAT. The parent of a differencing disk is opened only when a read needs it.

References: [MS-VHDX] §2.2-§2.6; §2.3.3 note <5> (in-memory replay on read-only opens).
"""

from __future__ import annotations

import io as _io
import os
import uuid
from functools import cached_property

import numpy as np

from vhdx.disk import chain as _chain
from vhdx.disk.extents import ExtentKind, Extents, bitmap_runs, clip, coalesce, concat_sorted, kinds_of_states, overlay
from vhdx.disk.writer import Writer, replay_log_on_disk
from vhdx.errors import ChainLoopError, FormatError, InvalidRequestError, VhdxError
from vhdx.format import constants as c
from vhdx.format import foreign, layouts
from vhdx.io import ImageIO
from vhdx.structures.bat import Bat, Geometry, entry_offsets, payload_missing_bytes
from vhdx.structures.header import HeaderSet, load_headers
from vhdx.structures.log import LogState, overlay_for, read_log
from vhdx.structures.metadata import DiskParameters, Metadata, load_metadata
from vhdx.structures.region import RegionTable, load_region_table

# Blocks examined per step when walking a whole disk: bounds memory for 64 TiB disks with 1 MiB blocks.
WINDOW_BLOCKS = 1 << 18
# Requests up to this size first try the per-block short path (random I/O through deep chains).
SMALL_READ = 1 << 20
# Sector bitmap blocks (1 MiB each) kept per read-only file.
BITMAP_CACHE_CHUNKS = 32


def foreign_file_reason(io: ImageIO) -> str | None:
    """'empty file ...' or 'this is a VHD (v1) disk ...' for a file that is not VHDX; None when we cannot tell."""
    size = io.real_size
    if size == 0:
        return "empty file (0 bytes), not VHDX"
    tail_at = max(size - foreign.TAIL_BYTES, 0)
    name = foreign.foreign_format(io.read_at(0, foreign.HEAD_BYTES), io.read_at(tail_at, size - tail_at))
    return f"this is {name}, not VHDX" if name else None


def _not_vhdx(io: ImageIO) -> FormatError:
    """Name an empty file or another disk format (VHD, qcow2, ...); otherwise say it is not VHDX.

    Never quote the bytes found: a parent locator can point at any file (/etc/shadow).
    """
    reason = foreign_file_reason(io) or "not a VHDX file (it does not start with the 'vhdxfile' signature)"
    return FormatError(reason, structure="File Type Identifier", offset=c.FILE_IDENTIFIER_OFFSET)


class VhdxImage:
    """One VHDX file, read-only by default; ``read`` and ``stream`` see the virtual disk through its chain."""

    def __init__(self, image_io: ImageIO, options: _chain.OpenOptions | None = None, *, _lineage=()) -> None:
        self.io = image_io
        self.options = options or _chain.OpenOptions()
        self._parent: VhdxImage | None = None
        self._parent_source: str | None = None
        self._writer: Writer | None = None
        self._bitmap_cache: dict[int, np.ndarray] = {}
        self.invented: tuple[tuple[int, int], ...] = ()  # (virtual offset, length) read as zeros by --salvage
        try:
            self._load()
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
    def _load(self, *, with_bat: bool = True) -> None:
        io = self.io
        if io.read_at(c.FILE_IDENTIFIER_OFFSET, len(c.FILE_SIGNATURE)) != c.FILE_SIGNATURE:
            raise _not_vhdx(io)
        try:
            ident = io.read_layout(layouts.FileIdentifier, c.FILE_IDENTIFIER_OFFSET)
            self.creator: str = ident.creator.rstrip("\x00")
        except FormatError:
            # The creator is diagnostic only: text that does not decode must not make the file unreadable.
            raw = io.read_at(c.FILE_IDENTIFIER_OFFSET + len(c.FILE_SIGNATURE), c.CREATOR_SIZE)
            self.creator = raw.decode("utf-16-le", "replace").split("\x00")[0]
        self.headers: HeaderSet = load_headers(io)
        header = self.headers.current
        self.log: LogState = read_log(io, header.log_offset, header.log_length, header.log_guid)
        if self.log.needs_replay:
            refusal = self.log.refusal()
            if refusal is not None:
                raise refusal
            if io.writable:
                self.headers = replay_log_on_disk(io, self.headers, self.log)
                self.log = LogState(header.log_offset, header.log_length, c.ZERO_GUID)
            else:
                # Read-only view of the replay: structures are read as if the log had been applied.
                io.overlay = overlay_for(self.log.plan)
        # A dirty log without any valid entry holds nothing that was applied (entries are durable before
        # their sectors are written), so the file reads correctly as it is; `check` reports it.
        self.regions: RegionTable = load_region_table(io, header.log_offset, header.log_length)
        self.metadata: Metadata = load_metadata(io, self.regions.metadata)
        p = self.metadata.params
        self.geometry = Geometry(p.virtual_size, p.block_size, p.logical_sector_size, p.has_parent)
        if with_bat:
            self.bat: Bat = Bat.load(io, self.regions.bat, self.geometry)
            self._validate_bat()

    def _validate_bat(self) -> None:
        """Refuse BATs that would make reads wrong: illegal states, blocks outside the file, missing bitmaps."""
        g, bat = self.geometry, self.bat
        states = bat.states
        legal_states = np.zeros(8, dtype=bool)
        legal_states[[s.value for s in c.BatState if s != c.BatState.PARTIALLY_PRESENT]] = True
        legal_states[c.BatState.PARTIALLY_PRESENT] = g.has_parent
        self._raise_first(~legal_states[states], "payload",
                          lambda s: f"state {s} is not legal in a {self.disk_type.label} disk")
        # Offsets are checked for allocated blocks only: a 64 TiB disk has 67 million entries, mostly empty.
        present = np.flatnonzero(bat.allocated_blocks())
        offsets = entry_offsets(bat.payload_entries[present])

        def flagged(bad: np.ndarray) -> np.ndarray:
            mask = np.zeros(len(states), dtype=bool)
            mask[present[bad]] = True
            return mask

        inside_header = offsets < c.HEADER_SECTION_SIZE
        if inside_header.any():
            self._raise_first(flagged(inside_header), "payload", lambda s: "block lies inside the header section")
        # A block's virtual disk data must lie inside the file (one rule with check: bat.payload_missing_bytes).
        size = self.io.size
        missing = payload_missing_bytes(g, present, offsets, size)
        beyond = missing > 0
        self.invented = ()
        if beyond.any() and self.options.salvage:
            # --salvage: the missing bytes read as zeros, and every virtual range so invented is listed.
            blocks, lost = present[beyond], missing[beyond]
            ends = np.minimum((blocks + 1) * g.block_size, g.virtual_size)
            self.invented = tuple(zip((ends - lost).tolist(), lost.tolist(), strict=True))
        elif beyond.any():
            self._raise_first(flagged(beyond), "payload",
                              lambda s: f"block lies beyond the end of the file ({size:#x}); truncated?",
                              hint="salvage")
        if g.has_parent:
            partial = states == c.BatState.PARTIALLY_PRESENT
            chunk_has_partial = np.zeros(g.sector_bitmap_blocks, dtype=bool)
            chunk_has_partial[np.flatnonzero(partial) // g.chunk_ratio] = True
            sb_present = bat.bitmap_states == c.SbState.PRESENT
            missing = chunk_has_partial & ~sb_present
            self._raise_first(missing, "bitmap", lambda s: "sector bitmap block missing for a partially present block")
            bad_sb = sb_present & ((bat.bitmap_offsets < c.HEADER_SECTION_SIZE)
                                   | (bat.bitmap_offsets + c.SECTOR_BITMAP_BLOCK_SIZE > size))
            self._raise_first(bad_sb, "bitmap", lambda s: "sector bitmap block lies outside the file")

    def _raise_first(self, mask: np.ndarray, kind: str, message, hint: str | None = None) -> None:
        hits = np.flatnonzero(mask)
        if not len(hits):
            return
        i = int(hits[0])
        if kind == "payload":
            index = int(self.geometry.payload_index(i))
            structure, state = f"BAT entry {index} (payload block {i})", int(self.bat.states[i])
        else:
            index = int(self.geometry.bitmap_index(i))
            structure, state = f"BAT entry {index} (sector bitmap block {i})", int(self.bat.bitmap_states[i])
        more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
        raise FormatError(message(state) + more, structure=structure, offset=self.bat.entry_file_offset(index),
                          hint=hint)

    def _file_identity(self):
        if self.io.fd is None:
            return None
        st = os.fstat(self.io.fd)
        return (st.st_dev, st.st_ino)

    # --- properties ---------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.io.path

    @property
    def params(self) -> DiskParameters:
        return self.metadata.params

    @property
    def virtual_size(self) -> int:
        return self.params.virtual_size

    @property
    def block_size(self) -> int:
        return self.params.block_size

    @property
    def logical_sector_size(self) -> int:
        return self.params.logical_sector_size

    @property
    def physical_sector_size(self) -> int:
        return self.params.physical_sector_size

    @property
    def disk_id(self) -> uuid.UUID:
        return self.params.virtual_disk_id

    @property
    def disk_type(self) -> c.DiskType:
        return self.params.disk_type

    @property
    def has_parent(self) -> bool:
        return self.params.has_parent

    @property
    def data_write_guid(self) -> uuid.UUID:
        return self.headers.current.data_write_guid

    @property
    def file_write_guid(self) -> uuid.UUID:
        return self.headers.current.file_write_guid

    @property
    def writable(self) -> bool:
        return self.io.writable

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
            offset = int(self.bat.bitmap_offsets[chunk])
            cached = np.frombuffer(self.io.read_at(offset, c.SECTOR_BITMAP_BLOCK_SIZE), dtype=np.uint8)
            if len(self._bitmap_cache) >= BITMAP_CACHE_CHUNKS:
                self._bitmap_cache.pop(next(iter(self._bitmap_cache)))
            self._bitmap_cache[chunk] = cached
        return cached

    def _bitmap_bytes(self, chunk: int, first_byte: int, length: int) -> np.ndarray:
        """``length`` bytes of a chunk's sector bitmap from ``first_byte``."""
        cached = self._chunk_bitmap(chunk)
        if cached is not None:
            return cached[first_byte : first_byte + length]
        offset = int(self.bat.bitmap_offsets[chunk]) + first_byte
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
            if self.bat.bitmap_states[chunk] != c.SbState.PRESENT:
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
        blocks = np.arange(b0, b1, dtype=np.int64)
        states = self.bat.states[b0:b1]
        offsets = self.bat.offsets[b0:b1]
        bstart = blocks * bs
        blen = np.minimum(bs, g.virtual_size - bstart)
        kinds = kinds_of_states(states)
        partial = states == c.BatState.PARTIALLY_PRESENT
        whole = ~partial
        fo = np.where(kinds[whole] == ExtentKind.DATA, offsets[whole], -1)
        parts = [Extents(bstart[whole], blen[whole], kinds[whole], np.full(int(whole.sum()), -1, np.int16), fo)]
        if partial.any():
            bits = self.read_bitmap_bits(blocks[partial])
            parts.append(bitmap_runs(bits, bstart[partial], offsets[partial], g.logical_sector_size))
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
        below = stack.pop()
        while stack:
            below = Extents(below.start, below.length, below.kind,
                            np.where(below.layer >= 0, below.layer + 1, -1).astype(np.int16), below.file_offset)
            below = overlay(stack.pop(), below)
        return below

    # --- reading ------------------------------------------------------------------------------------
    def readinto(self, offset: int, buf) -> int:
        """Fill ``buf`` with virtual disk bytes from ``offset``; returns the count (short only at the end)."""
        view = memoryview(buf).cast("B")
        if offset < 0:
            raise InvalidRequestError(f"negative offset {offset}")
        n = max(0, min(len(view), self.virtual_size - offset))
        if n == 0:
            return 0
        if n <= SMALL_READ and self._read_within_one_block(offset, view[:n]):
            return n
        layers = [self]
        target = np.frombuffer(view, dtype=np.uint8) if not view.readonly else None
        for start, length, kind, layer, file_offset in self.extents(offset, offset + n).rows():
            lo = start - offset
            if kind == ExtentKind.DATA:
                while len(layers) <= layer:
                    layers.append(layers[-1].parent)
                layers[layer].io.readinto_at(file_offset, view[lo : lo + length])
            else:
                target[lo : lo + length] = 0
        return n

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
            state = int(image.bat.states[block])
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
                image.io.readinto_at(int(image.bat.offsets[block]) + in_block, view)
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
        blocks = int(self.bat.allocated_blocks().sum()) * self.block_size
        bitmaps = int((self.bat.bitmap_states == c.SbState.PRESENT).sum()) * c.SECTOR_BITMAP_BLOCK_SIZE
        return blocks + bitmaps if self.has_parent else blocks

    # --- writing ------------------------------------------------------------------------------------
    @property
    def writer(self) -> Writer:
        """Write state of a writable open (created on first use)."""
        if not self.io.writable:
            raise VhdxError("image is open read-only (open it with writable=True)", path=self.path)
        if self._writer is None:
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
            try:
                writer.abort()
            except Exception:  # noqa: BLE001 - the file stays as a crash here would leave it; the first error wins
                pass
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


def read_structures(path) -> VhdxImage:
    """A file's identifier, headers, log state, regions and metadata, without its BAT; the file is closed again.

    The result answers ``creator``, ``headers``, ``log``, ``regions``, ``metadata`` and the properties built on
    them (``disk_type``, ``data_write_guid``...); anything that needs the BAT or the file fails.
    """
    image = VhdxImage.__new__(VhdxImage)
    image.io = ImageIO.open(path)
    try:
        image._load(with_bat=False)
        image.options = _chain.OpenOptions(orphan=True)
        image._parent = None
        return image
    except VhdxError as exc:
        raise exc.with_path(image.io.path) from None
    finally:
        image.io.close()


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
