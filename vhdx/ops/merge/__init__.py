"""Merge engine: fold differencing disks into an ancestor, offline, crash-safe and resumable.

``plan_merge`` is pure: from the BAT arrays (and sector bitmaps) of the layers being folded in and of the
destination it computes every byte range to copy, every range to zero, every new BAT and sector bitmap
value, and where new blocks go (appended at the end of the file in virtual order). ``apply_merge`` carries a
plan out on the destination with ``copy_file_range``. ``merge`` adds the safety checks, the intent record
(``merge_journal``), the DataWriteGuid hand-over of product note <12>, relinking of the merged child's own
children, and the removal of the merged files. Every file it changes or deletes stays open under its exclusive
writer lock from planning to the end (``HeldFiles``), and each merged file is checked unchanged right before it
is deleted. ``abort_merge`` gives an interrupted merge up: a rollback before the destination's first change,
else a list of what stays.

Why the chain keeps reading the same bytes during a merge: the destination only changes at sectors that a
layer above it defines (data or zeros), which those layers hide from every reader of the chain; and the
layer right above the destination accepts the destination's new DataWriteGuid (parent_linkage2) before the
destination takes it. Every step of a plan writes absolute values, so running it again after a crash (the
``--resume`` path) gives the same file.

References: [MS-VHDX] §2.4 (sector bitmap, LSB-first), §2.5.1 (BAT states), §2.6.1.2 (IsVirtualDisk items on
merge), §2.6.2.6.3 and note <12> (parent_linkage2), §2.2.2 (DataWriteGuid).
"""

from __future__ import annotations

import errno
import hashlib
import io as _io
import os
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from functools import cached_property

import numpy as np

from vhdx.disk.extents import ExtentKind, Extents, clip, coalesce, concat_sorted
from vhdx.disk.image import VhdxImage, open_image, read_disk_parameters
from vhdx.errors import LockedError, MergeError, UnsupportedError, VhdxError
from vhdx.format import constants as c
from vhdx.format.guid import format_guid_text
from vhdx.io import COPY_CHUNK, BackgroundFlush, ImageIO, copy_range
from vhdx.ops.merge import journal as mj
from vhdx.structures.bat import ceil_div
from vhdx.structures.header import load_headers

BS = c.BatState
# States a payload block reads as zeros in, whatever the disk type.
ZERO_READING = np.array(c.ZERO_READING_STATES, dtype=np.uint8)
# States that decide a whole block of a layer (data or zeros): the parent is never consulted there.
WHOLE_STATES = np.array([*c.ZERO_READING_STATES, BS.FULLY_PRESENT], dtype=np.uint8)
DEST_KINDS = ("fixed", "dynamic", "differencing")
# Bound on unpacked sector bits examined at once (per layer): about 4 MiB of booleans.
SECTOR_BATCH = 1 << 22
# Bound on allocation units per planning window.
WINDOW_UNITS = 1 << 18


# --- plan inputs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerArrays:
    """What planning needs of one file: its geometry, BAT states and offsets, and its sector bitmaps.

    ``partial_bitmaps`` holds one row of packed bits (LSB-first, as on disk) per PARTIALLY_PRESENT block, in
    the order of ``partial_blocks``.
    """

    virtual_size: int
    block_size: int
    sector_size: int
    states: np.ndarray  # uint8 per payload block
    offsets: np.ndarray  # int64 file offset per payload block
    partial_blocks: np.ndarray  # int64, sorted
    partial_bitmaps: np.ndarray  # (len(partial_blocks), block_size // sector_size // 8) uint8

    @classmethod
    def build(cls, virtual_size: int, block_size: int, sector_size: int, states, offsets=None,
              bits: dict[int, np.ndarray] | None = None) -> LayerArrays:
        """Arrays from plain values (tests): ``bits`` maps a partially present block to its 0/1 sector bits."""
        states = np.asarray(states, dtype=np.uint8)
        offsets = np.zeros(len(states), np.int64) if offsets is None else np.asarray(offsets, dtype=np.int64)
        partial = np.flatnonzero(states == BS.PARTIALLY_PRESENT).astype(np.int64)
        spb = block_size // sector_size
        rows = np.zeros((len(partial), spb), dtype=np.uint8)
        for i, b in enumerate(partial.tolist()):
            rows[i] = np.asarray((bits or {})[b], dtype=np.uint8)
        packed = np.packbits(rows, axis=1, bitorder="little")
        return cls(virtual_size, block_size, sector_size, states, offsets, partial, packed)

    def bits_of(self, blocks: np.ndarray, first_byte: np.ndarray, nbytes: int) -> np.ndarray:
        """Unpacked sector bits (len(blocks), nbytes*8) of partially present ``blocks`` from ``first_byte``."""
        rows = np.searchsorted(self.partial_blocks, blocks)
        packed = self.partial_bitmaps[rows[:, None], first_byte[:, None] + np.arange(nbytes)]
        return np.unpackbits(packed, axis=1, bitorder="little")


@dataclass(frozen=True)
class DestArrays:
    """The destination: its arrays plus what allocation needs."""

    layer: LayerArrays
    kind: str  # "fixed", "dynamic" or "differencing"
    bitmap_present: np.ndarray  # bool per chunk: the sector bitmap block exists
    bitmap_offsets: np.ndarray  # int64 per chunk
    reusable: np.ndarray  # bool per block: the space a ZERO/UNMAPPED/UNDEFINED entry kept may be reused
    alloc_base: int  # first free 1 MiB-aligned offset past every structure
    file_size: int

    @property
    def chunk_ratio(self) -> int:
        return (c.SECTORS_PER_CHUNK * self.layer.sector_size) // self.layer.block_size


# --- the plan ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergePlan:
    """Everything a merge does to the destination, as arrays (sorted, coalesced, absolute values)."""

    virtual_size: int
    sector_size: int
    dest_kind: str
    dest_block_size: int
    layer_count: int  # layers folded in (sources), child = 0
    alloc_base: int
    file_size: int  # destination size before the merge
    final_file_size: int
    block_source: np.ndarray  # int16 per destination block: top-most layer that changes it, -1 untouched
    copy_layer: np.ndarray  # int16 source layer of each copy
    copy_src: np.ndarray  # int64 file offset in the source layer
    copy_dst: np.ndarray  # int64 file offset in the destination
    copy_len: np.ndarray  # int64 bytes
    zero_dst: np.ndarray  # int64 destination file ranges to fill with zeros (before any copy)
    zero_len: np.ndarray
    bat_blocks: np.ndarray  # int64 destination payload blocks whose entry changes
    bat_states: np.ndarray  # uint8 new state
    bat_offsets: np.ndarray  # int64 new file offset
    sb_chunks: np.ndarray  # int64 chunks that get a new sector bitmap block
    sb_offsets: np.ndarray  # int64 where
    bitmap_blocks: np.ndarray  # int64 partially present blocks whose sector bits change
    bitmap_bytes: np.ndarray  # (len(bitmap_blocks), bytes per block) uint8: their final packed bits
    new_blocks: int  # payload blocks appended to the file
    reused_blocks: int  # payload blocks placed in space their ZERO/UNMAPPED entry had kept

    @property
    def bytes_to_copy(self) -> int:
        return int(self.copy_len.sum())

    @property
    def bytes_to_zero(self) -> int:
        return int(self.zero_len.sum())

    @property
    def blocks_touched(self) -> int:
        return int((self.block_source >= 0).sum())

    @property
    def new_bytes(self) -> int:
        """Bytes the destination file grows by."""
        return max(0, self.final_file_size - self.file_size)

    @cached_property
    def digest(self) -> str:
        """sha256 over every field, so a saved plan can be matched with the journal that names it."""
        h = hashlib.sha256()
        for f in fields(self):
            value = getattr(self, f.name)
            h.update(f.name.encode())
            if isinstance(value, np.ndarray):
                h.update(str(value.dtype).encode() + str(value.shape).encode())
                h.update(np.ascontiguousarray(value).tobytes())
            else:
                h.update(repr(value).encode())
        return h.hexdigest()

    def summary(self) -> dict:
        return {"blocks_touched": self.blocks_touched, "bytes_to_copy": self.bytes_to_copy,
                "copy_runs": len(self.copy_len), "bytes_to_zero": self.bytes_to_zero,
                "bat_entries_changed": len(self.bat_blocks), "new_blocks": self.new_blocks,
                "reused_blocks": self.reused_blocks, "new_sector_bitmaps": len(self.sb_chunks),
                "new_bytes": self.new_bytes, "file_size": self.file_size, "final_size_estimate": self.final_file_size,
                "virtual_size": self.virtual_size, "digest": self.digest}

    def to_bytes(self) -> bytes:
        buf = _io.BytesIO()
        np.savez(buf, **{f.name: np.asarray(getattr(self, f.name)) for f in fields(self)})
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str | None = None) -> MergePlan:
        try:
            with np.load(_io.BytesIO(data), allow_pickle=False) as npz:
                values = {}
                for f in fields(cls):
                    arr = npz[f.name]
                    values[f.name] = arr if arr.ndim else arr.item()
        except (OSError, KeyError, ValueError) as exc:
            raise MergeError(f"saved merge plan is unreadable ({exc})", path=where) from None
        values["dest_kind"] = str(values["dest_kind"])
        return cls(**values)


# --- planning (pure) -----------------------------------------------------------------------------------
def _unit_views(layers: Sequence[LayerArrays], unit: int, u: np.ndarray):
    """Per layer and unit: state, block index, offset of the unit inside its block (stacked, (k, n))."""
    k, n = len(layers), len(u)
    states = np.empty((k, n), np.uint8)
    blocks = np.empty((k, n), np.int64)
    within = np.empty((k, n), np.int64)
    file_at = np.empty((k, n), np.int64)
    start = u * unit
    for i, layer in enumerate(layers):
        b = start // layer.block_size
        inside = start < layer.virtual_size
        bc = np.minimum(b, max(len(layer.states) - 1, 0))
        # Past a smaller layer's end the layers above read zeros, whatever lies below it.
        states[i] = np.where(inside, layer.states[bc] if len(layer.states) else BS.ZERO, BS.ZERO)
        blocks[i] = bc
        within[i] = start - b * layer.block_size
        file_at[i] = (layer.offsets[bc] if len(layer.offsets) else 0) + within[i]
    return states, blocks, within, file_at


def source_extents(layers: Sequence[LayerArrays], start: int, end: int, unit: int) -> Extents:
    """What the layers above the destination say about [start, end): DATA (layer, file offset), ZERO, or ABSENT.

    ``start`` is a multiple of ``unit`` (the smallest block size involved). Whole units are decided by the
    top-most layer whose block state is not NOT_PRESENT (argmax over the stacked masks); units whose top
    state is PARTIALLY_PRESENT are resolved per sector over the stacked sector bitmaps.
    """
    ss = layers[0].sector_size
    u = np.arange(start // unit, ceil_div(end, unit), dtype=np.int64)
    states, blocks, within, file_at = _unit_views(layers, unit, u)
    opaque = states != BS.NOT_PRESENT
    top = np.argmax(opaque, axis=0)
    cols = np.arange(len(u))
    decided = opaque[top, cols]
    top_state = states[top, cols]
    whole = ~decided | (top_state != BS.PARTIALLY_PRESENT)
    kind = np.where(~decided, ExtentKind.ABSENT,
                    np.where(top_state == BS.FULLY_PRESENT, ExtentKind.DATA, ExtentKind.ZERO)).astype(np.uint8)
    fo = np.where(kind == ExtentKind.DATA, file_at[top, cols], -1)
    layer = np.where(decided, top, -1).astype(np.int16)
    w = np.flatnonzero(whole)
    parts = [Extents(u[w] * unit, np.full(len(w), unit, np.int64), kind[w], layer[w], fo[w].astype(np.int64))]
    partial = np.flatnonzero(~whole)
    spu = unit // ss
    batch = max(1, SECTOR_BATCH // spu)
    for lo in range(0, len(partial), batch):
        parts.append(_sector_extents(layers, partial[lo : lo + batch], u, states, blocks, within, file_at, spu, ss))
    ext = concat_sorted(parts)
    return coalesce(clip(ext, start, end))


def _sector_extents(layers, sel, u, states, blocks, within, file_at, spu, ss) -> Extents:
    """Per-sector resolution of the units ``sel`` (indexes into ``u``) over every layer's sector bitmap."""
    k, n = len(layers), len(sel)
    defined = np.zeros((k, n, spu), dtype=bool)
    for i, layer in enumerate(layers):
        st = states[i, sel]
        defined[i] = np.isin(st, WHOLE_STATES)[:, None]
        pm = np.flatnonzero(st == BS.PARTIALLY_PRESENT)
        if len(pm):
            bits = layer.bits_of(blocks[i, sel[pm]], within[i, sel[pm]] // ss // 8, spu // 8)
            defined[i, pm] = bits.astype(bool)
    src = np.argmax(defined, axis=0)  # (n, spu): top-most layer defining each sector
    any_def = np.take_along_axis(defined, src[None], axis=0)[0]
    col = sel[:, None]
    sstate = states[src, col]
    kind = np.where(~any_def, ExtentKind.ABSENT,
                    np.where((sstate == BS.FULLY_PRESENT) | (sstate == BS.PARTIALLY_PRESENT),
                             ExtentKind.DATA, ExtentKind.ZERO)).astype(np.uint8)
    layer = np.where(any_def, src, -1).astype(np.int16)
    sector = np.arange(spu, dtype=np.int64)[None, :]
    fo = np.where(kind == ExtentKind.DATA, file_at[src, col] + sector * ss, -1)
    # Runs: a new run starts at each unit's first sector and wherever kind or layer changes.
    flat_kind, flat_layer, flat_fo = kind.reshape(-1), layer.reshape(-1), fo.reshape(-1)
    change = np.ones(n * spu, dtype=bool)
    change[1:] = (flat_kind[1:] != flat_kind[:-1]) | (flat_layer[1:] != flat_layer[:-1])
    change[::spu] = True
    starts = np.flatnonzero(change)
    lengths = np.diff(np.append(starts, n * spu)) * ss
    vstart = u[sel][starts // spu] * spu * ss + (starts % spu) * ss
    return Extents(vstart.astype(np.int64), lengths.astype(np.int64), flat_kind[starts], flat_layer[starts],
                   flat_fo[starts].astype(np.int64))


def _split_at_blocks(ext: Extents, block_size: int):
    """Cut extents at destination block boundaries: (start, length, kind, layer, file_offset, block)."""
    first = ext.start // block_size
    last = (ext.end - 1) // block_size
    count = last - first + 1
    rep = np.repeat(np.arange(len(ext)), count)
    step = np.arange(len(rep)) - np.repeat(np.cumsum(count) - count, count)
    block = first[rep] + step
    s = np.maximum(ext.start[rep], block * block_size)
    e = np.minimum(ext.end[rep], (block + 1) * block_size)
    fo = np.where(ext.kind[rep] == ExtentKind.DATA, ext.file_offset[rep] + (s - ext.start[rep]), -1)
    return s, e - s, ext.kind[rep], ext.layer[rep], fo, block


def _coalesce_copies(layer, src, dst, length):
    if len(length) <= 1:
        return layer, src, dst, length
    join = (layer[1:] == layer[:-1]) & (src[1:] == src[:-1] + length[:-1]) & (dst[1:] == dst[:-1] + length[:-1])
    idx = np.flatnonzero(np.concatenate(([True], ~join)))
    return layer[idx], src[idx], dst[idx], np.add.reduceat(length, idx)


def _coalesce_ranges(dst, length):
    if len(length) <= 1:
        return dst, length
    order = np.argsort(dst, kind="stable")
    dst, length = dst[order], length[order]
    join = dst[1:] == dst[:-1] + length[:-1]
    idx = np.flatnonzero(np.concatenate(([True], ~join)))
    return dst[idx], np.add.reduceat(length, idx)


def plan_merge(layers: Sequence[LayerArrays], dest: DestArrays, *, virtual_size: int | None = None) -> MergePlan:
    """Plan folding ``layers`` (child first) into ``dest`` (pure; see the module docstring).

    Per destination block, after the sources are resolved: whole block of zeros -> ZERO state (a fixed
    destination gets zeros written); a present block is written in place (a partially present one gets its
    sector bitmap OR-ed and is promoted when every sector is set); a block that reads zeros gets new space
    (or the space its entry kept) and becomes FULLY_PRESENT; a NOT_PRESENT block of a differencing
    destination gets new space and becomes PARTIALLY_PRESENT with only the covered sectors set, or
    FULLY_PRESENT when covered entirely.
    """
    if not layers:
        raise MergeError("nothing to merge: no layer above the destination")
    d = dest.layer
    ss = d.sector_size
    if any(layer.sector_size != ss for layer in layers):
        raise MergeError("the layers do not share one logical sector size")
    if dest.kind not in DEST_KINDS:
        raise MergeError(f"unknown destination kind {dest.kind!r}")
    vsize = virtual_size if virtual_size is not None else layers[0].virtual_size
    bs = d.block_size
    unit = min([bs, *(layer.block_size for layer in layers)])
    for layer in (*layers[1:], d):
        if layer.virtual_size < vsize and layer.virtual_size % unit:
            raise UnsupportedError(f"a layer of {layer.virtual_size} bytes under a larger child must end on a "
                                   f"{unit}-byte boundary to be merged")
    nblocks = ceil_div(vsize, bs)
    spb = bs // ss
    diff = dest.kind == "differencing"
    fixed = dest.kind == "fixed"
    window = max(1, WINDOW_UNITS * unit // bs)
    block_source = np.full(nblocks, -1, np.int16)
    out = {k: [] for k in ("cl", "cs", "cd", "cn", "zd", "zn", "bb", "bst", "bo", "mb", "mbits", "newb")}
    next_new = reused_total = 0
    for b0 in range(0, nblocks, window):
        b1 = min(nblocks, b0 + window)
        ext = source_extents(layers, b0 * bs, min(b1 * bs, vsize), unit)
        ext = _keep(ext, ext.kind != ExtentKind.ABSENT)
        if not len(ext):
            continue
        ps, pl, pk, player, pfo, pb = _split_at_blocks(ext, bs)
        local = pb - b0
        w = b1 - b0
        blocks = np.arange(b0, b1, dtype=np.int64)
        inside = blocks < len(d.states)
        dstate = np.where(inside, d.states[np.minimum(blocks, len(d.states) - 1)], BS.NOT_PRESENT).astype(np.uint8)
        doff = np.where(inside, d.offsets[np.minimum(blocks, len(d.offsets) - 1)], 0)
        reusable = np.where(inside, dest.reusable[np.minimum(blocks, len(dest.reusable) - 1)], False)
        blen = np.minimum(bs, vsize - blocks * bs)
        cov = np.bincount(local, weights=pl, minlength=w).astype(np.int64)
        has_data = np.bincount(local, weights=(pk == ExtentKind.DATA), minlength=w) > 0
        touched = cov > 0
        full = cov == blen
        src_top = np.full(w, np.iinfo(np.int16).max, np.int16)
        np.minimum.at(src_top, local, player)
        block_source[b0:b1] = np.where(touched, src_top, -1)

        zero_reading = np.isin(dstate, ZERO_READING) | ((dstate == BS.NOT_PRESENT) & (not diff))
        fully, partial = dstate == BS.FULLY_PRESENT, dstate == BS.PARTIALLY_PRESENT
        whole_zero = touched & full & ~has_data & (not fixed) & ~zero_reading
        rest = touched & ~whole_zero
        in_place = rest & (fully | partial)
        fresh_diff = rest & diff & (dstate == BS.NOT_PRESENT)
        fresh_zero = rest & zero_reading & has_data
        alloc = fresh_diff | fresh_zero
        reuse = fresh_zero & reusable
        new = alloc & ~reuse
        new_off = dest.alloc_base + (next_new + np.cumsum(new) - 1) * bs
        next_new += int(new.sum())
        reused_total += int(reuse.sum())
        target = np.where(in_place | reuse, doff, np.where(new, new_off, -1))

        # Data: every DATA piece of a block that is written; zeros: ZERO pieces of blocks written in place.
        writes = in_place | alloc
        is_data = (pk == ExtentKind.DATA) & writes[local]
        dst = target[local] + (ps - pb * bs)
        out["cl"].append(player[is_data])
        out["cs"].append(pfo[is_data])
        out["cd"].append(dst[is_data])
        out["cn"].append(pl[is_data])
        is_zero = (pk == ExtentKind.ZERO) & in_place[local]
        out["zd"].append(np.concatenate((dst[is_zero], doff[reuse])))
        out["zn"].append(np.concatenate((pl[is_zero], np.full(int(reuse.sum()), bs, np.int64))))

        # Sector bits of blocks that stay or become partially present (differencing destination only).
        bitmap_sel = np.flatnonzero((in_place & partial) | (fresh_diff & ~full))
        promote = np.zeros(w, dtype=bool)
        if len(bitmap_sel):
            row_of = np.full(w, -1, np.int64)
            row_of[bitmap_sel] = np.arange(len(bitmap_sel))
            mine = row_of[local] >= 0
            rows = row_of[local[mine]]
            s0 = (ps[mine] - pb[mine] * bs) // ss
            s1 = ceil_div(ps[mine] + pl[mine] - pb[mine] * bs, ss)
            marks = np.zeros((len(bitmap_sel), spb + 1), np.int32)
            np.add.at(marks, (rows, s0), 1)
            np.add.at(marks, (rows, s1), -1)
            bits = np.cumsum(marks, axis=1)[:, :spb] > 0
            was_partial = partial[bitmap_sel]
            if was_partial.any():
                old = d.bits_of(blocks[bitmap_sel[was_partial]], np.zeros(int(was_partial.sum()), np.int64), spb // 8)
                bits[was_partial] |= old.astype(bool)
            valid = ceil_div(blen[bitmap_sel], ss)
            all_set = np.all(bits | (np.arange(spb)[None, :] >= valid[:, None]), axis=1)
            promote[bitmap_sel[all_set]] = True
            keep = ~all_set
            out["mb"].append(blocks[bitmap_sel[keep]])
            out["mbits"].append(np.packbits(bits[keep], axis=1, bitorder="little"))

        # New BAT entries.
        to_zero = whole_zero
        to_full = fresh_zero | (fresh_diff & (full | promote)) | (in_place & partial & promote)
        to_partial = fresh_diff & ~full & ~promote
        for mask, state in ((to_zero, BS.ZERO), (to_full, BS.FULLY_PRESENT), (to_partial, BS.PARTIALLY_PRESENT)):
            sel = np.flatnonzero(mask)
            out["bb"].append(blocks[sel])
            out["bst"].append(np.full(len(sel), state, np.uint8))
            out["bo"].append(np.where(mask, np.where(to_zero, doff, target), 0)[sel])
        out["newb"].append(blocks[to_partial])

    cat = {k: (np.concatenate(v) if v else None) for k, v in out.items()}
    empty = np.zeros(0, np.int64)
    cl = cat["cl"].astype(np.int16) if cat["cl"] is not None else empty.astype(np.int16)
    cs, cd, cn = (cat[k] if cat[k] is not None else empty for k in ("cs", "cd", "cn"))
    cl, cs, cd, cn = _coalesce_copies(cl, cs.astype(np.int64), cd.astype(np.int64), cn.astype(np.int64))
    zd, zn = (cat[k] if cat[k] is not None else empty for k in ("zd", "zn"))
    zd, zn = _coalesce_ranges(zd.astype(np.int64), zn.astype(np.int64))
    bb = cat["bb"] if cat["bb"] is not None else empty
    order = np.argsort(bb, kind="stable")
    bb = bb[order]
    bst = (cat["bst"] if cat["bst"] is not None else empty.astype(np.uint8))[order].astype(np.uint8)
    bo = (cat["bo"] if cat["bo"] is not None else empty)[order].astype(np.int64)
    mb = cat["mb"] if cat["mb"] is not None else empty
    mbits = cat["mbits"] if cat["mbits"] is not None else np.zeros((0, spb // 8), np.uint8)
    # A sector bitmap block for each chunk that gains a partially present block and has none yet.
    newb = cat["newb"] if cat["newb"] is not None else empty
    chunks = np.unique(newb // dest.chunk_ratio) if len(newb) else empty
    chunks = chunks[~dest.bitmap_present[chunks]] if len(chunks) else empty
    sb_base = dest.alloc_base + next_new * bs
    sb_offsets = sb_base + np.arange(len(chunks), dtype=np.int64) * c.SECTOR_BITMAP_BLOCK_SIZE
    end = sb_base + len(chunks) * c.SECTOR_BITMAP_BLOCK_SIZE
    final = max(dest.file_size, end) if (next_new or len(chunks)) else dest.file_size
    return MergePlan(
        virtual_size=vsize, sector_size=ss, dest_kind=dest.kind, dest_block_size=bs, layer_count=len(layers),
        alloc_base=dest.alloc_base, file_size=dest.file_size, final_file_size=final, block_source=block_source,
        copy_layer=cl, copy_src=cs, copy_dst=cd, copy_len=cn, zero_dst=zd, zero_len=zn,
        bat_blocks=bb.astype(np.int64), bat_states=bst, bat_offsets=bo, sb_chunks=chunks.astype(np.int64),
        sb_offsets=sb_offsets, bitmap_blocks=mb.astype(np.int64), bitmap_bytes=mbits.astype(np.uint8),
        new_blocks=next_new, reused_blocks=reused_total)


def _keep(ext: Extents, mask: np.ndarray) -> Extents:
    return Extents(ext.start[mask], ext.length[mask], ext.kind[mask], ext.layer[mask], ext.file_offset[mask])


# --- reading plan inputs from images -------------------------------------------------------------------
def read_layer_arrays(image: VhdxImage) -> LayerArrays:
    """A file's BAT arrays and the packed sector bits of its partially present blocks (one read per chunk)."""
    bat = image.bat
    states = bat.states.copy()
    partial = np.flatnonzero(states == BS.PARTIALLY_PRESENT).astype(np.int64)
    per = image.geometry.bitmap_bytes_per_block
    packed = np.zeros((len(partial), per), np.uint8)
    step = max(1, SECTOR_BATCH // max(per * 8, 1))
    for lo in range(0, len(partial), step):
        bits = image.read_bitmap_bits(partial[lo : lo + step])
        packed[lo : lo + step] = np.packbits(bits, axis=1, bitorder="little")
    return LayerArrays(image.virtual_size, image.block_size, image.logical_sector_size, states,
                       bat.offsets.copy(), partial, packed)


def dest_kind_of(image: VhdxImage) -> str:
    if image.has_parent:
        return "differencing"
    return "fixed" if image.params.leave_block_allocated else "dynamic"


def reusable_blocks(states: np.ndarray, offsets: np.ndarray, block_size: int, file_size: int,
                    held: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Blocks whose ZERO/UNMAPPED/UNDEFINED entry kept space that nothing else overlaps (vectorised).

    ``held`` lists (starts, ends) of everything else that owns file space: present blocks, sector bitmap
    blocks, the header section, log, BAT and metadata regions.
    """
    cand = (np.isin(states, ZERO_READING) & (offsets >= c.HEADER_SECTION_SIZE) & (offsets % c.ALIGNMENT == 0)
            & (offsets + block_size <= file_size))
    idx = np.flatnonzero(cand)
    out = np.zeros(len(states), dtype=bool)
    if not len(idx):
        return out
    starts = np.concatenate([offsets[idx], *(s for s, _ in held)]).astype(np.int64)
    ends = np.concatenate([offsets[idx] + block_size, *(e for _, e in held)]).astype(np.int64)
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    prev_end = np.concatenate(([np.iinfo(np.int64).min], np.maximum.accumulate(e)[:-1]))
    next_start = np.concatenate((s[1:], [np.iinfo(np.int64).max]))
    alone = (prev_end <= s) & (next_start >= e)
    lone = np.empty(len(order), dtype=bool)
    lone[order] = alone
    out[idx] = lone[: len(idx)]
    return out


def read_dest_arrays(image: VhdxImage) -> DestArrays:
    from vhdx.disk.writer import end_of_structures

    layer = read_layer_arrays(image)
    bat = image.bat
    present = bat.allocated_blocks()
    sb = bat.bitmap_states == c.SbState.PRESENT
    header = image.headers.current
    regions = [(0, c.HEADER_SECTION_SIZE), (header.log_offset, header.log_offset + header.log_length),
               (image.regions.bat.file_offset, image.regions.bat.end),
               (image.regions.metadata.file_offset, image.regions.metadata.end)]
    held = [(bat.offsets[present], bat.offsets[present] + image.block_size),
            (bat.bitmap_offsets[sb], bat.bitmap_offsets[sb] + c.SECTOR_BITMAP_BLOCK_SIZE),
            (np.array([r[0] for r in regions], np.int64), np.array([r[1] for r in regions], np.int64))]
    size = image.io.real_size
    reusable = reusable_blocks(bat.states, bat.offsets, image.block_size, size, held)
    return DestArrays(layer, dest_kind_of(image), sb.copy() if image.has_parent else np.zeros(len(sb), bool),
                      bat.bitmap_offsets.copy(), reusable, end_of_structures(image), size)


# --- applying (I/O) ------------------------------------------------------------------------------------
PROGRESS_STEP = 64 * c.MiB


def _copy(src: ImageIO, src_offset: int, dst: ImageIO, dst_offset: int, length: int, buf: bytearray) -> None:
    """Copy file bytes between images: in the kernel when the destination is a plain file descriptor."""
    if dst.fd is not None and type(dst).write_at is ImageIO.write_at:
        try:
            copy_range(src, src_offset, dst.fd, dst_offset, length, buf)
        except VhdxError as exc:
            raise exc.with_path(dst.path) from None
        return
    view = memoryview(buf)
    done = 0
    while done < length:
        n = min(len(buf), length - done)
        src.readinto_at(src_offset + done, view[:n])
        dst.write_at(dst_offset + done, view[:n])
        done += n


def apply_merge(dest: VhdxImage, plan: MergePlan, sources: Sequence[ImageIO], *,
                progress: Callable[[int, int], None] | None = None) -> int:
    """Carry out ``plan`` on ``dest`` (open for writing, session begun); returns the bytes copied and zeroed.

    Order: grow the file; zero fills; copies; one commit for sector bitmap entries and bits (the data is
    flushed first); one commit for the payload BAT entries. A crash between the two commits leaves bits set
    only where the layers above still hide them, so every state in between reads the same through the chain.
    """
    io, writer = dest.io, dest.writer
    if dest.block_size != plan.dest_block_size or dest_kind_of(dest) != plan.dest_kind:
        raise MergeError("the destination's geometry differs from the plan", path=dest.path)
    if plan.final_file_size > io.real_size:
        io.truncate(plan.final_file_size)
    total = plan.bytes_to_copy + plan.bytes_to_zero
    done = 0
    zeros = bytes(COPY_CHUNK)
    for dst, n in zip(plan.zero_dst.tolist(), plan.zero_len.tolist(), strict=True):
        for pos in range(0, n, COPY_CHUNK):
            io.write_at(dst + pos, zeros[: min(COPY_CHUNK, n - pos)])
        done += n
        if progress:
            progress(done, total)
    buf = bytearray(COPY_CHUNK)
    with BackgroundFlush(io):
        for layer, src, dst, n in zip(plan.copy_layer.tolist(), plan.copy_src.tolist(), plan.copy_dst.tolist(),
                                      plan.copy_len.tolist(), strict=True):
            for pos in range(0, n, PROGRESS_STEP):
                step = min(PROGRESS_STEP, n - pos)
                _copy(sources[layer], src + pos, io, dst + pos, step, buf)
                done += step
                if progress:
                    progress(done, total)
    for chunk, offset in zip(plan.sb_chunks.tolist(), plan.sb_offsets.tolist(), strict=True):
        writer.set_bitmap_entry(chunk, c.SbState.PRESENT, offset)
    _stage_bitmaps(dest, plan)
    writer.commit()
    for state in np.unique(plan.bat_states).tolist():
        sel = plan.bat_states == state
        writer.set_payload(plan.bat_blocks[sel], state, plan.bat_offsets[sel])
    writer.commit()
    return done


def _stage_bitmaps(dest: VhdxImage, plan: MergePlan) -> None:
    """Stage the final sector bits of each changed block, one span per chunk (through the log)."""
    if not len(plan.bitmap_blocks):
        return
    g = dest.geometry
    per = g.bitmap_bytes_per_block
    chunks = plan.bitmap_blocks // g.chunk_ratio
    for chunk in np.unique(chunks).tolist():
        sel = np.flatnonzero(chunks == chunk)
        within = plan.bitmap_blocks[sel] % g.chunk_ratio
        lo, hi = int(within.min()), int(within.max()) + 1
        base = int(dest.bat.bitmap_offsets[chunk]) + lo * per
        span = np.frombuffer(dest.io.read_at(base, (hi - lo) * per), np.uint8).reshape(hi - lo, per).copy()
        span[within - lo] = plan.bitmap_bytes[sel]
        dest.writer.stage(base, span.tobytes())


# --- the merge operation -------------------------------------------------------------------------------
Opener = Callable[[str], ImageIO]


def _default_opener(path: str) -> ImageIO:
    return ImageIO.open(path, writable=True)


class HeldFiles:
    """Every file a merge changes or deletes, kept open under its exclusive writer lock until the merge ends.

    Images are opened on borrowed handles of these descriptors, so from planning to deletion no other writer
    gets in, and a second merge of the same chain is refused when it asks for the lock.
    """

    def __init__(self, opener: Opener, child: str) -> None:
        self._opener = opener
        self.child = child
        self._held: dict[str, ImageIO] = {}

    def hold(self, path: str) -> None:
        key = os.path.realpath(path)
        if key in self._held:
            return
        try:
            self._held[key] = self._opener(path)
        except LockedError:
            raise MergeError("in use by another process (a writer, or another merge of this chain); nothing was "
                             "changed", path=path) from None

    def holds(self, path: str) -> bool:
        return os.path.realpath(path) in self._held

    def open(self, path: str) -> ImageIO:
        io = self._held.get(os.path.realpath(path))
        return io.borrow() if io is not None else self._opener(path)

    def snapshot(self, path: str) -> mj.MergedLayer:
        """What a held file looks like now: its GUIDs, size and modification time."""
        io = self._held[os.path.realpath(path)]
        header = load_headers(io).current
        st = os.fstat(io.fd) if io.fd is not None else None
        return mj.MergedLayer(path, str(header.data_write_guid), str(header.file_write_guid), io.real_size,
                              st.st_mtime_ns if st is not None else None)

    def verify(self, recorded: mj.MergedLayer, *, skip=()) -> mj.MergedLayer:
        """Stop unless ``recorded.path`` is still the held file, unchanged; returns its snapshot."""
        io = self._held[os.path.realpath(recorded.path)]
        try:
            same = io.fd is None or os.path.samestat(os.stat(recorded.path), os.fstat(io.fd))
        except OSError:
            same = False
        now = self.snapshot(recorded.path)
        changed = recorded.changes_since(now, skip=skip)
        if not same or changed:
            labels = {"data_write_guid": "DataWriteGuid", "file_write_guid": "FileWriteGuid", "size": "size",
                      "mtime_ns": "modification time"}
            what = "replaced" if not same else "changed"
            detail = f" ({', '.join(labels[n] for n in changed)} differ)" if same else ""
            raise MergeError(f"{what} while the merge ran{detail}, by a writer that bypassed its lock; nothing was "
                             "deleted and the chain keeps what was written; `vhdx merge --abort "
                             f"{self.child}` gives the merge up", path=recorded.path)
        return now

    def close(self) -> None:
        for io in self._held.values():
            io.close()
        self._held.clear()


def _out_of_space(exc: Exception) -> bool:
    text = exc.message if isinstance(exc, VhdxError) else str(exc)
    return any(os.strerror(code) in text for code in (errno.ENOSPC, errno.EDQUOT))


@contextmanager
def _resume_hint_when_full(child: str, destination: str):
    """ENOSPC in the middle of a merge: say which file and how to finish once there is room."""
    try:
        yield
    except VhdxError as exc:
        if not _out_of_space(exc):
            raise
        raise MergeError(f"no space left on the device while merging ({exc.message}); the chain still reads its "
                         f"original data: free some space, then run `vhdx merge --resume {child}`",
                         path=exc.path or destination) from None


@dataclass(frozen=True)
class MergeResult:
    """What a merge did (or, with ``dry_run``, would do)."""

    child: str
    destination: str
    merged: tuple[str, ...]  # files folded in, child first
    dry_run: bool
    plan: dict | None  # MergePlan.summary()
    relinked: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()  # merged files renamed to *.merged
    bytes_moved: int = 0
    seconds: float = 0.0
    verified: bool | None = None
    resumed: bool = False
    warnings: tuple[str, ...] = field(default=())

    @property
    def mib_per_second(self) -> float:
        return self.bytes_moved / c.MiB / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {"child": self.child, "destination": self.destination, "merged": list(self.merged),
                "dry_run": self.dry_run, "plan": self.plan, "relinked": list(self.relinked),
                "removed": list(self.removed), "kept": list(self.kept), "bytes_moved": self.bytes_moved,
                "seconds": round(self.seconds, 3), "mib_per_second": round(self.mib_per_second, 1),
                "verified": self.verified, "resumed": self.resumed, "warnings": list(self.warnings)}


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def _destination_index(layers: Sequence[VhdxImage], into) -> int:
    if len(layers) < 2:
        raise MergeError(f"{layers[0].path} is not a differencing disk: there is nothing to merge it into")
    if into is None:
        return 1
    for i, layer in enumerate(layers[1:], start=1):
        if _same_file(layer.path, os.fspath(into)):
            return i
    if _same_file(layers[0].path, os.fspath(into)):
        raise MergeError("a disk cannot be merged into itself")
    raise MergeError(f"{os.fspath(into)} is not an ancestor of {layers[0].path}; the chain is: "
                     + " -> ".join(layer.path for layer in layers))


def find_dependents(folders, exclude: Sequence[str]) -> dict[uuid.UUID, list[str]]:
    """Differencing disks in ``folders`` (not in ``exclude``) by the parent DataWriteGuids they accept."""
    found: dict[uuid.UUID, list[str]] = {}
    excluded = [os.path.realpath(p) for p in exclude]
    seen = set()
    for folder in folders:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            path = os.path.join(os.path.abspath(folder), name)
            real = os.path.realpath(path)
            if real in seen or real in excluded or not name.lower().endswith((".vhdx", ".avhdx")):
                continue
            seen.add(real)
            if not os.path.isfile(path):
                continue
            try:
                params = read_disk_parameters(path)  # no BAT: folders may hold huge sparse disks
            except VhdxError:
                continue
            if params.has_parent:
                for guid in params.parent_locator.linkages:
                    found.setdefault(guid, []).append(path)
    return found


def _preflight(layers: Sequence[VhdxImage], k: int, search_dirs, force: bool,
               probe_writers: bool = False) -> tuple[list[str], list[str]]:
    """Refuse unsafe merges; returns (children of the merged child to relink, warnings).

    ``probe_writers``: ask whether another process writes a layer (a dry run, which holds no lock itself).
    """
    dest = layers[k]
    for layer in layers[: k + 1]:
        if layer.log.is_dirty:
            raise MergeError("the log holds updates not yet applied; run `vhdx repair` (or open it for writing) "
                             "first", path=layer.path, structure="Log")
        if probe_writers and layer.io.writer_lock_held():
            raise MergeError("another process has this file open for writing", path=layer.path)
        if layer.logical_sector_size != dest.logical_sector_size:
            raise MergeError(f"logical sector size {layer.logical_sector_size} differs from the destination's "
                             f"({dest.logical_sector_size})", path=layer.path)
    for layer in layers[: k + 1]:
        pending = mj.journal_for_destination(layer.path)
        if pending is not None:
            raise MergeError(f"an interrupted merge of {pending.child} into this disk is pending; finish it with "
                             f"`vhdx merge --resume {pending.child}` or undo it with `vhdx merge --abort "
                             f"{pending.child}`", path=layer.path)
    if dest_kind_of(dest) == "fixed" and layers[0].virtual_size > dest.virtual_size:
        raise UnsupportedError("growing a fixed destination to the child's larger size is not supported",
                               path=dest.path)
    folders = list(dict.fromkeys([*(os.path.dirname(os.path.abspath(layer.path)) for layer in layers),
                                  *(os.fspath(d) for d in search_dirs)]))
    deps = find_dependents(folders, [layer.path for layer in layers])
    warnings = []
    for i in range(1, k + 1):
        others = deps.get(layers[i].data_write_guid, [])
        if not others:
            continue
        what = "the destination" if i == k else f"{layers[i].path}, which the merge folds in"
        text = f"{', '.join(others)} depend{'s' if len(others) == 1 else ''} on {what}"
        if not force:
            raise MergeError(f"{text}; merging would invalidate {'it' if len(others) == 1 else 'them'} "
                             "(--force accepts that: they will then refuse to open instead of reading wrong data)")
        warnings.append(f"{text}; {'it' if len(others) == 1 else 'they'} will no longer open")
    return deps.get(layers[0].data_write_guid, []), warnings


def check_free_space(destination: str, plan: MergePlan) -> None:
    need = plan.new_bytes
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(destination)))
    except (OSError, AttributeError):
        return
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise MergeError(f"not enough free space: the merge needs up to {need} bytes, {free} are free",
                         path=destination)


def view_digests(image: VhdxImage, block_size: int, size: int | None = None) -> np.ndarray:
    """A 16-byte digest of each ``block_size`` piece of the virtual disk seen through ``image``'s chain."""
    size = image.virtual_size if size is None else size
    count = ceil_div(size, block_size)
    out = np.zeros((count, 16), np.uint8)
    per_read = max(1, COPY_CHUNK // block_size)
    buf = bytearray(per_read * block_size)
    view = memoryview(buf)
    for b0 in range(0, count, per_read):
        start = b0 * block_size
        n = min(len(buf), size - start)
        got = image.readinto(start, view[:n])
        view[got:n] = bytes(n - got)
        for i in range(ceil_div(n, block_size)):
            piece = view[i * block_size : min(n, (i + 1) * block_size)]
            out[b0 + i] = np.frombuffer(hashlib.blake2b(piece, digest_size=16).digest(), np.uint8)
    return out


def _merged_items(dest_items, child_items):
    """IsVirtualDisk rule (§2.6.1.2): the destination's such items are replaced by the child's."""
    def key(item):
        return item.item_id, bool(item.flags & c.META_IS_USER)

    child_vd = {key(i): i for i in child_items if i.flags & c.META_IS_VIRTUAL_DISK}
    out, used = [], set()
    for item in dest_items:
        if item.flags & c.META_IS_VIRTUAL_DISK:
            if key(item) in child_vd:
                out.append(child_vd[key(item)])
                used.add(key(item))
        else:
            out.append(item)
    out.extend(i for k, i in child_vd.items() if k not in used)
    return out


def _open_writable(path: str, opener: Opener) -> VhdxImage:
    # force: the merge weighed the disks that depend on this one itself (_preflight).
    return open_image(opener(path), orphan=True, force=True)


def _set_locator(path: str, opener: Opener, make_entries) -> None:
    """Rewrite the parent locator of ``path`` to ``make_entries(image, old_entries)`` (through its log)."""
    from vhdx.structures.metadata import MetadataItem, build_parent_locator, read_items

    with _open_writable(path, opener) as image:
        old = list(image.params.parent_locator.entries)
        new = make_entries(image, old)
        if new == old:
            return
        items = [MetadataItem(i.item_id, i.flags, build_parent_locator(new))
                 if i.item_id == c.PARENT_LOCATOR_GUID and not i.flags & c.META_IS_USER else i
                 for i in read_items(image.io, image.metadata)]
        image.writer.begin(changes_data=False)
        image.writer.rewrite_metadata(items)


def _accept_new_guid(path: str, guid: uuid.UUID, opener: Opener) -> None:
    """Note <12>: the destination's child accepts the new DataWriteGuid (parent_linkage2) before it changes."""
    text = format_guid_text(guid)

    def entries(_image, old):
        if any(k == c.PARENT_LINKAGE2_KEY and v.lower() == text.lower() for k, v in old):
            return old
        return [(k, v) for k, v in old if k != c.PARENT_LINKAGE2_KEY] + [(c.PARENT_LINKAGE2_KEY, text)]

    _set_locator(path, opener, entries)


def _relink(path: str, destination: str, guid: uuid.UUID, opener: Opener) -> None:
    """Point a child of the merged child at the destination (linkage = its new DataWriteGuid, fresh paths)."""
    from vhdx.ops.relink import plan_locator

    _set_locator(path, opener, lambda _image, old: plan_locator(path, destination, old, guid))


def _write_destination(journal: mj.MergeJournal, plan: MergePlan, sources: Sequence[ImageIO], child_items,
                       opener: Opener, progress) -> int:
    from vhdx.structures.bat import Geometry
    from vhdx.structures.metadata import read_items

    # Session 1: new DataWriteGuid, then the IsVirtualDisk items (and a larger size) through the log.
    with _open_writable(journal.destination, opener) as image:
        if image.data_write_guid not in (journal.old_guid, journal.new_guid):
            raise MergeError(f"the destination's DataWriteGuid is {image.data_write_guid}, neither the one the "
                             "merge was planned against nor the new one: it was changed meanwhile",
                             path=image.path)
        image.writer.begin(changes_data=True, data_write_guid=journal.new_guid)
        current = read_items(image.io, image.metadata)
        wanted = _merged_items(current, child_items)
        if plan.virtual_size > image.virtual_size:
            g = Geometry(plan.virtual_size, image.block_size, image.logical_sector_size, image.has_parent)
            needed = g.bat_entries * c.BAT_ENTRY_SIZE
            if needed > image.regions.bat.length:
                raise UnsupportedError(f"the destination's BAT region ({image.regions.bat.length} bytes) cannot "
                                       f"describe the child's size ({needed} bytes needed)", path=image.path)
            have = len(image.bat.entries) * c.BAT_ENTRY_SIZE
            image.writer.stage(image.bat.file_offset + have, bytes(needed - have))
        if wanted != current:
            image.writer.rewrite_metadata(wanted)
    # Session 2: the data and the BAT.
    with _open_writable(journal.destination, opener) as image:
        image.writer.begin(changes_data=True, data_write_guid=journal.new_guid)
        return apply_merge(image, plan, sources, progress=progress)


def _check_chain_matches(journal: mj.MergeJournal, layers: Sequence[VhdxImage]) -> None:
    k = len(journal.layers)
    ok = len(layers) > k and _same_file(layers[k].path, journal.destination)
    for recorded, layer in zip(journal.layers, layers[:k], strict=False):
        ok = ok and _same_file(layer.path, recorded.path) and str(layer.data_write_guid) == recorded.data_write_guid
    if not ok:
        raise MergeError("the chain is no longer the one the merge was planned for (a layer was written to or "
                         "replaced); the merge cannot continue", path=journal.child)


def _run(journal: mj.MergeJournal, plan: MergePlan | None, *, search_dirs, verify: bool, progress,
         held: HeldFiles, resumed: bool, started: float, warnings=()) -> MergeResult:
    from vhdx.structures.metadata import read_items

    moved, verified = 0, None
    if journal.state == "planned":
        with open_image(journal.child, search_dirs=search_dirs) as top:
            layers = top.layers
            _check_chain_matches(journal, layers)
            k = len(journal.layers)
            accepting = journal.layers[-1]
            # A resumed merge may already have written the accepting layer's locator (FileWriteGuid, mtime).
            expected = [held.verify(layer, skip=("file_write_guid", "mtime_ns") if resumed and layer is accepting
                                    else ()) for layer in journal.layers]
            before = view_digests(top, plan.dest_block_size, plan.virtual_size) if verify else None
            child_items = read_items(top.io, top.metadata)
            _accept_new_guid(accepting.path, journal.new_guid, held.open)
            expected[-1] = held.snapshot(accepting.path)
            moved = _write_destination(journal, plan, [layer.io for layer in layers[:k]], child_items, held.open,
                                       progress)
        if verify:
            with open_image(journal.destination, search_dirs=search_dirs) as merged:
                after = view_digests(merged, plan.dest_block_size, plan.virtual_size)
            bad = np.flatnonzero(np.any(before != after, axis=1))
            if len(bad):
                raise MergeError(f"verification failed: {len(bad)} block(s) differ after the merge (first: block "
                                 f"{int(bad[0])}); the merged files are left in place and the chain still reads "
                                 "the original data", path=journal.destination)
            verified = True
        # The layers were read during the data phase: they must still be what was merged.
        expected = [held.verify(layer) for layer in expected]
        journal = replace(journal, layers=tuple(expected)).advanced("data_done")
        mj.write_journal(journal)
    relinked = tuple(journal.dependents)
    if journal.state == "data_done":
        for path in journal.dependents:
            _relink(path, journal.destination, journal.new_guid, held.open)
        journal = journal.advanced("relinked")
        mj.write_journal(journal)
    removed, kept = [], []
    for layer in journal.layers:
        if held.holds(layer.path):  # gone already when a crash came after its deletion
            held.verify(layer)  # right before it goes: a write that got past the lock must not be lost
        if journal.keep:
            mj.rename_file(layer.path, layer.path + mj.MERGED_SUFFIX)
            kept.append(layer.path + mj.MERGED_SUFFIX)
        else:
            mj.remove_file(layer.path)
            removed.append(layer.path)
    mj.remove_journal(journal)
    return MergeResult(journal.child, journal.destination, tuple(layer.path for layer in journal.layers), False,
                       plan.summary() if plan is not None else None, relinked, tuple(removed), tuple(kept), moved,
                       time.monotonic() - started, verified, resumed, tuple(warnings))


def merge(child, into=None, *, dry_run: bool = False, verify: bool = False,
          progress: Callable[[int, int], None] | None = None, keep: bool = False, search_dirs=(),
          force: bool = False, resume: bool = False, opener: Opener | None = None) -> MergeResult:
    """Merge the differencing disk ``child`` into its parent, or down to the ancestor ``into``.

    Like ``Merge-VHD -Path child [-DestinationPath into]``: afterwards the destination reads what the child
    read, the child and the layers between are deleted (``keep``: renamed to ``*.merged``), and the child's own
    children are relinked to the destination. From planning to the end every file the merge changes or deletes
    is held open under an exclusive writer lock, and each merged file is checked unchanged right before it goes.

    Args:
        child: the differencing disk to merge.
        into: an ancestor of ``child`` (default: its parent).
        dry_run: plan and check only; nothing is written.
        verify: compare the chain's view before with the destination's view after, block by block.
        progress: called as ``progress(done_bytes, total_bytes)`` while data moves.
        keep: rename the merged files instead of deleting them.
        search_dirs: more folders to look in for parents and for disks that depend on the destination.
        force: merge even though other disks depend on the destination (they stop opening afterwards).
        resume: finish an interrupted merge of ``child`` from its journal (none: merge it now).
        opener: opens a file for writing (default ``ImageIO.open(path, writable=True)``).
    """
    child = os.path.abspath(os.fspath(child))
    opener = opener or _default_opener
    started = time.monotonic()
    if resume:
        pending = find_interrupted(child, search_dirs)
        if pending is not None:
            if into is not None and not _same_file(os.fspath(into), pending.destination):
                raise MergeError(f"the interrupted merge of this disk goes into {pending.destination}, not "
                                 f"{os.fspath(into)}", path=child)
            return _resume(pending, search_dirs=search_dirs, verify=verify, progress=progress, opener=opener,
                           started=started)
        # Nothing was begun: an ordinary merge.
    held = HeldFiles(opener, child)
    try:
        if not dry_run:
            with open_image(child, search_dirs=search_dirs) as top:
                layers = top.layers
                for layer in layers[: _destination_index(layers, into) + 1]:
                    held.hold(layer.path)
        # (Re)opened under the locks: what is planned now cannot change before the merge ends.
        with open_image(child, search_dirs=search_dirs) as top:
            layers = top.layers
            k = _destination_index(layers, into)
            if not dry_run and not all(held.holds(layer.path) for layer in layers[: k + 1]):
                raise MergeError("the chain changed while the merge was starting; nothing was changed, try again",
                                 path=child)
            dependents, warnings = _preflight(layers, k, search_dirs, force, probe_writers=dry_run)
            upper, dest = layers[:k], layers[k]
            plan = plan_merge([read_layer_arrays(layer) for layer in upper], read_dest_arrays(dest),
                              virtual_size=top.virtual_size)
            check_free_space(dest.path, plan)
            merged = tuple(os.path.abspath(layer.path) for layer in upper)
            if dry_run:
                return MergeResult(child, os.path.abspath(dest.path), merged, True, plan.summary(),
                                   relinked=tuple(dependents), seconds=time.monotonic() - started,
                                   warnings=tuple(warnings))
            for path in dependents:  # relinked at the end
                held.hold(path)
            locator = dict(upper[-1].params.parent_locator.entries)
            journal = mj.MergeJournal(
                child=child, destination=os.path.abspath(dest.path), destination_guid=str(dest.data_write_guid),
                new_data_write_guid=str(uuid.uuid4()),
                layers=tuple(replace(held.snapshot(layer.path), path=path)
                             for path, layer in zip(merged, upper, strict=True)),
                dependents=tuple(os.path.abspath(p) for p in dependents), plan_digest=plan.digest, keep=keep,
                previous_linkage2=locator.get(c.PARENT_LINKAGE2_KEY))
        with _resume_hint_when_full(child, journal.destination):
            # The plan and the intent are durable before the first byte of any disk changes.
            mj.atomic_write(journal.plan_path, plan.to_bytes())
            mj.write_journal(journal)
            return _run(journal, plan, search_dirs=search_dirs, verify=verify, progress=progress, held=held,
                        resumed=False, started=started, warnings=warnings)
    finally:
        held.close()


def find_interrupted(child: str, search_dirs=()) -> mj.MergeJournal | None:
    """The journal of an interrupted merge that started from ``child``, if there is one."""
    child = os.path.abspath(child)
    folders = [os.path.dirname(child), *(os.fspath(d) for d in search_dirs)]
    found = mj.find_journals_for_child(child, folders)
    if not found and os.path.exists(child):
        try:
            with open_image(child, search_dirs=search_dirs) as top:
                for layer in top.layers[1:]:
                    journal = mj.journal_for_destination(layer.path)
                    if journal is not None and _same_file(journal.child, child):
                        found.append(journal)
        except VhdxError:
            pass
    return found[0] if found else None


def _hold_journal_files(held: HeldFiles, journal: mj.MergeJournal) -> None:
    """Lock what an interrupted merge still changes or deletes (files it already deleted are skipped)."""
    for path in (journal.destination, *(layer.path for layer in journal.layers), *journal.dependents):
        if os.path.exists(path):
            held.hold(path)


def _resume(journal: mj.MergeJournal, *, search_dirs, verify, progress, opener, started) -> MergeResult:
    held = HeldFiles(opener, journal.child)
    try:
        _hold_journal_files(held, journal)
        plan = None
        if journal.state == "planned":
            try:
                with open(journal.plan_path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise MergeError(f"the saved merge plan is missing: {exc.strerror}; `vhdx merge --abort "
                                 f"{journal.child}` gives the merge up", path=journal.plan_path) from None
            plan = MergePlan.from_bytes(data, journal.plan_path)
            if plan.digest != journal.plan_digest:
                raise MergeError("the saved merge plan does not match the digest in the journal",
                                 path=journal.plan_path)
        with _resume_hint_when_full(journal.child, journal.destination):
            return _run(journal, plan, search_dirs=search_dirs, verify=verify, progress=progress, held=held,
                        resumed=True, started=started)
    finally:
        held.close()


# --- giving an interrupted merge up --------------------------------------------------------------------
@dataclass(frozen=True)
class AbortResult:
    """What ``abort`` did: a full rollback, or the merge given up with what it had already done."""

    child: str
    destination: str
    state: str  # the journal's step when the merge stopped
    rolled_back: bool  # True: every file is as before the merge
    remains: tuple[str, ...]  # what stays changed, one sentence each (empty after a rollback)

    def to_json(self) -> dict:
        return {"child": self.child, "destination": self.destination, "state": self.state,
                "rolled_back": self.rolled_back, "remains": list(self.remains)}


def abort_merge(child, *, search_dirs=(), opener: Opener | None = None) -> AbortResult:
    """Give up the interrupted merge of ``child`` (``vhdx merge --abort``); never deletes or loses data.

    Before its point of no return (the destination's first change, when it takes its new DataWriteGuid) the
    merge is rolled back entirely: the accepting layer's parent locator gets its former parent_linkage2 back.
    Later, the journal is removed and what stays changed is listed; the chain reads the same in every case.
    """
    child = os.path.abspath(os.fspath(child))
    journal = find_interrupted(child, search_dirs)
    if journal is None:
        raise MergeError("no interrupted merge of this disk was found (no *.merge-journal names it); nothing to "
                         "abort", path=child)
    if not os.path.exists(journal.destination):
        raise MergeError(f"the destination {journal.destination} of the interrupted merge is gone; nothing to roll "
                         f"back (remove {journal.path} and {journal.plan_path} by hand)", path=child)
    held = HeldFiles(opener or _default_opener, journal.child)
    try:
        _hold_journal_files(held, journal)
        accepting = journal.layers[-1].path
        dest_guid = held.snapshot(journal.destination).data_write_guid
        untouched = journal.state == "planned" and dest_guid.lower() == journal.destination_guid.lower()
        if untouched and os.path.exists(accepting):
            _restore_linkage2(accepting, journal, held.open)
        remains = () if untouched else _what_remains(journal)
        mj.remove_journal(journal)
    finally:
        held.close()
    return AbortResult(journal.child, journal.destination, journal.state, untouched, remains)


def _restore_linkage2(path: str, journal: mj.MergeJournal, opener: Opener) -> None:
    new = format_guid_text(journal.new_guid).lower()

    def entries(_image, old):
        if not any(k == c.PARENT_LINKAGE2_KEY and v.lower() == new for k, v in old):
            return old
        out = [(k, v) for k, v in old if k != c.PARENT_LINKAGE2_KEY]
        if journal.previous_linkage2:
            out.append((c.PARENT_LINKAGE2_KEY, journal.previous_linkage2))
        return out

    _set_locator(path, opener, entries)


def _what_remains(journal: mj.MergeJournal) -> tuple[str, ...]:
    dest, child = journal.destination, journal.child
    present = [layer.path for layer in journal.layers if os.path.exists(layer.path)]
    gone = [layer.path for layer in journal.layers if not os.path.exists(layer.path)]
    out = []
    if journal.state == "planned":
        out.append(f"{dest} has its new DataWriteGuid {journal.new_data_write_guid} and part of the merged data, "
                   f"only where {child} and the layers above it hide it: the chain reads as before, {dest} read "
                   "alone is partly merged")
        out.append(f"{journal.layers[-1].path} accepts that DataWriteGuid (parent_linkage2), so it still opens "
                   f"on {dest}")
        out.append(f"space the merge added to {dest} may show as leaked in `vhdx check` (`vhdx repair --leaks` "
                   "reclaims it)")
    else:
        out.append(f"{dest} holds the whole merge: it reads what {child} read")
        if present:
            out.append(f"{', '.join(present)} are kept and read the same as before; nothing needs them any more")
        if journal.state == "relinked" and journal.dependents:
            out.append(f"{', '.join(journal.dependents)} already point at {dest}")
    if gone:
        out.append(f"{', '.join(gone)} were already deleted")
    out.append(f"`vhdx merge {child}` merges afresh whenever wanted" if os.path.exists(child)
               else f"{child} no longer exists")
    return tuple(out)
