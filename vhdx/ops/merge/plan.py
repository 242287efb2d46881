"""The merge planner (pure numpy): from the layers' BAT arrays and sector bitmaps, everything a merge writes.

``plan_merge`` computes every byte range to copy, every range to zero, every new BAT and sector bitmap value,
and where new blocks go (appended at the end of the file in virtual order). It works one window of destination
blocks at a time (``plan_window``, a ``WindowPlan`` with named fields) and joins the windows into one
``MergePlan``. Every value is absolute, so running a plan again after a crash gives the same file.

References: [MS-VHDX] §2.4 (sector bitmap, LSB-first), §2.5.1 (BAT states).
"""

from __future__ import annotations

import hashlib
import io as _io
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np

from vhdx.disk.extents import ExtentKind, Extents, clip, coalesce, concat_sorted
from vhdx.errors import MergeError, UnsupportedError
from vhdx.format import constants as c
from vhdx.structures.bat import allocated_mask, ceil_div

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
    touched_blocks: np.ndarray  # int64 destination blocks the merge changes, sorted
    touched_sources: np.ndarray  # int16 the top-most layer that changes each of them
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
        return len(self.touched_blocks)

    @property
    def block_source(self) -> np.ndarray:
        """int16 per destination block: top-most layer that changes it, -1 untouched (a whole-disk array)."""
        out = np.full(ceil_div(self.virtual_size, self.dest_block_size), -1, np.int16)
        out[self.touched_blocks] = self.touched_sources
        return out

    @property
    def new_bytes(self) -> int:
        """Bytes the destination file grows by."""
        return max(0, self.final_file_size - self.file_size)

    @cached_property
    def digest(self) -> str:
        """sha256 over every field, so a saved plan can be matched with the journal that names it."""
        return _digest((f.name, getattr(self, f.name)) for f in fields(self))

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
                saved = {name: npz[name] for name in npz.files}
            saved = {name: arr if arr.ndim else arr.item() for name, arr in saved.items()}
            legacy = "block_source" in saved and "touched_blocks" not in saved
            if legacy:
                # Saved by a merge interrupted under an older version, which kept the top-most source of every
                # destination block; its journal names the digest of the fields as they were saved then.
                saved_digest = _digest(saved.items())
                source = saved.pop("block_source")
                touched = np.flatnonzero(source >= 0)
                saved["touched_blocks"], saved["touched_sources"] = touched, source[touched].astype(np.int16)
            values = {f.name: saved[f.name] for f in fields(cls)}
        except (OSError, KeyError, ValueError) as exc:
            raise MergeError(f"saved merge plan is unreadable ({exc})", path=where) from None
        values["dest_kind"] = str(values["dest_kind"])
        plan = cls(**values)
        if legacy:
            plan.__dict__["digest"] = saved_digest  # the cached digest: what the older journal recorded
        return plan


def _digest(items) -> str:
    """sha256 over (name, value) pairs: arrays by dtype, shape and bytes, other values by repr."""
    h = hashlib.sha256()
    for name, value in items:
        h.update(name.encode())
        if isinstance(value, np.ndarray):
            h.update(str(value.dtype).encode() + str(value.shape).encode())
            h.update(np.ascontiguousarray(value).tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


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
                    np.where(allocated_mask(sstate), ExtentKind.DATA, ExtentKind.ZERO)).astype(np.uint8)
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


@dataclass(frozen=True)
class WindowPlan:
    """What one window of destination blocks [first_block, first_block + len(block_source)) contributes."""

    first_block: int
    block_source: np.ndarray  # int16 per block of the window: top-most layer that changes it, -1 untouched
    copy_layer: np.ndarray  # int16
    copy_src: np.ndarray  # int64
    copy_dst: np.ndarray  # int64
    copy_len: np.ndarray  # int64
    zero_dst: np.ndarray  # int64
    zero_len: np.ndarray  # int64
    bat_blocks: np.ndarray  # int64, grouped by state
    bat_states: np.ndarray  # uint8
    bat_offsets: np.ndarray  # int64
    bitmap_blocks: np.ndarray  # int64 partially present blocks whose sector bits change
    bitmap_bytes: np.ndarray  # (len(bitmap_blocks), bytes per block) uint8
    new_partial: np.ndarray  # int64 blocks that become partially present in new space (need a sector bitmap)
    new_blocks: int  # payload blocks appended to the file by this window
    reused_blocks: int


@dataclass(frozen=True)
class _Shape:
    """What every window shares: the merge's sizes and the destination's kind."""

    vsize: int
    unit: int
    block_size: int
    sector_size: int
    diff: bool
    fixed: bool


def _shape(layers: Sequence[LayerArrays], dest: DestArrays, virtual_size: int | None) -> _Shape:
    if not layers:
        raise MergeError("nothing to merge: no layer above the destination")
    d = dest.layer
    ss = d.sector_size
    if any(layer.sector_size != ss for layer in layers):
        raise MergeError("the layers do not share one logical sector size")
    if dest.kind not in DEST_KINDS:
        raise MergeError(f"unknown destination kind {dest.kind!r}")
    vsize = virtual_size if virtual_size is not None else layers[0].virtual_size
    unit = min([d.block_size, *(layer.block_size for layer in layers)])
    for layer in (*layers[1:], d):
        if layer.virtual_size < vsize and layer.virtual_size % unit:
            raise UnsupportedError(f"a layer of {layer.virtual_size} bytes under a larger child must end on a "
                                   f"{unit}-byte boundary to be merged")
    return _Shape(vsize, unit, d.block_size, ss, dest.kind == "differencing", dest.kind == "fixed")


def plan_window(layers: Sequence[LayerArrays], dest: DestArrays, shape: _Shape, b0: int, b1: int,
                next_new: int) -> WindowPlan | None:
    """Plan destination blocks [b0, b1); new blocks are numbered from ``next_new`` (None: nothing to do)."""
    d, bs, ss, vsize = dest.layer, shape.block_size, shape.sector_size, shape.vsize
    diff, fixed = shape.diff, shape.fixed
    spb = bs // ss
    ext = source_extents(layers, b0 * bs, min(b1 * bs, vsize), shape.unit)
    ext = _keep(ext, ext.kind != ExtentKind.ABSENT)
    if not len(ext):
        return None
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
    block_source = np.where(touched, src_top, -1).astype(np.int16)

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
    target = np.where(in_place | reuse, doff, np.where(new, new_off, -1))

    # Data: every DATA piece of a block that is written; zeros: ZERO pieces of blocks written in place.
    writes = in_place | alloc
    is_data = (pk == ExtentKind.DATA) & writes[local]
    dst = target[local] + (ps - pb * bs)
    is_zero = (pk == ExtentKind.ZERO) & in_place[local]

    # Sector bits of blocks that stay or become partially present (differencing destination only).
    bitmap_sel = np.flatnonzero((in_place & partial) | (fresh_diff & ~full))
    promote = np.zeros(w, dtype=bool)
    bitmap_blocks = np.zeros(0, np.int64)
    bitmap_bytes = np.zeros((0, spb // 8), np.uint8)
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
        bitmap_blocks = blocks[bitmap_sel[keep]]
        bitmap_bytes = np.packbits(bits[keep], axis=1, bitorder="little")

    # New BAT entries.
    to_zero = whole_zero
    to_full = fresh_zero | (fresh_diff & (full | promote)) | (in_place & partial & promote)
    to_partial = fresh_diff & ~full & ~promote
    bat = [(np.flatnonzero(mask), mask, state)
           for mask, state in ((to_zero, BS.ZERO), (to_full, BS.FULLY_PRESENT), (to_partial, BS.PARTIALLY_PRESENT))]
    return WindowPlan(
        first_block=b0, block_source=block_source,
        copy_layer=player[is_data].astype(np.int16), copy_src=pfo[is_data].astype(np.int64),
        copy_dst=dst[is_data].astype(np.int64), copy_len=pl[is_data].astype(np.int64),
        zero_dst=np.concatenate((dst[is_zero], doff[reuse])).astype(np.int64),
        zero_len=np.concatenate((pl[is_zero], np.full(int(reuse.sum()), bs, np.int64))).astype(np.int64),
        bat_blocks=np.concatenate([blocks[sel] for sel, _, _ in bat]),
        bat_states=np.concatenate([np.full(len(sel), state, np.uint8) for sel, _, state in bat]),
        bat_offsets=np.concatenate([np.where(mask, np.where(to_zero, doff, target), 0)[sel]
                                    for sel, mask, _ in bat]).astype(np.int64),
        bitmap_blocks=bitmap_blocks.astype(np.int64), bitmap_bytes=bitmap_bytes.astype(np.uint8),
        new_partial=blocks[to_partial], new_blocks=int(new.sum()), reused_blocks=int(reuse.sum()))


def _joined(windows: list[WindowPlan], name: str, empty: np.ndarray) -> np.ndarray:
    return np.concatenate([getattr(w, name) for w in windows]) if windows else empty


def plan_merge(layers: Sequence[LayerArrays], dest: DestArrays, *, virtual_size: int | None = None) -> MergePlan:
    """Plan folding ``layers`` (child first) into ``dest`` (pure; see the module docstring).

    Per destination block, after the sources are resolved: whole block of zeros -> ZERO state (a fixed
    destination gets zeros written); a present block is written in place (a partially present one gets its
    sector bitmap OR-ed and is promoted when every sector is set); a block that reads zeros gets new space
    (or the space its entry kept) and becomes FULLY_PRESENT; a NOT_PRESENT block of a differencing
    destination gets new space and becomes PARTIALLY_PRESENT with only the covered sectors set, or
    FULLY_PRESENT when covered entirely.
    """
    shape = _shape(layers, dest, virtual_size)
    bs, spb = shape.block_size, shape.block_size // shape.sector_size
    nblocks = ceil_div(shape.vsize, bs)
    window = max(1, WINDOW_UNITS * shape.unit // bs)
    touched: list[np.ndarray] = []
    sources: list[np.ndarray] = []
    windows: list[WindowPlan] = []
    next_new = 0
    for b0 in range(0, nblocks, window):
        b1 = min(nblocks, b0 + window)
        if _all_absent(layers, b0 * bs, min(b1 * bs, shape.vsize)):
            continue  # nothing above the destination there: no window arrays (a 64 TiB disk is mostly this)
        part = plan_window(layers, dest, shape, b0, b1, next_new)
        if part is None:
            continue
        local = np.flatnonzero(part.block_source >= 0)
        touched.append(local + b0)
        sources.append(part.block_source[local])
        next_new += part.new_blocks
        windows.append(part)
    i64 = np.zeros(0, np.int64)
    cl, cs, cd, cn = _coalesce_copies(*(_joined(windows, n, i64.astype(np.int16) if n == "copy_layer" else i64)
                                        for n in ("copy_layer", "copy_src", "copy_dst", "copy_len")))
    zd, zn = _coalesce_ranges(_joined(windows, "zero_dst", i64), _joined(windows, "zero_len", i64))
    bb = _joined(windows, "bat_blocks", i64)
    order = np.argsort(bb, kind="stable")
    bst = _joined(windows, "bat_states", i64.astype(np.uint8))[order]
    bo = _joined(windows, "bat_offsets", i64)[order]
    mb = _joined(windows, "bitmap_blocks", i64)
    mbits = _joined(windows, "bitmap_bytes", np.zeros((0, spb // 8), np.uint8))
    # A sector bitmap block for each chunk that gains a partially present block and has none yet.
    newb = _joined(windows, "new_partial", i64)
    chunks = np.unique(newb // dest.chunk_ratio) if len(newb) else i64
    chunks = chunks[~dest.bitmap_present[chunks]] if len(chunks) else i64
    sb_base = dest.alloc_base + next_new * bs
    sb_offsets = sb_base + np.arange(len(chunks), dtype=np.int64) * c.SECTOR_BITMAP_BLOCK_SIZE
    end = sb_base + len(chunks) * c.SECTOR_BITMAP_BLOCK_SIZE
    final = max(dest.file_size, end) if (next_new or len(chunks)) else dest.file_size
    return MergePlan(
        virtual_size=shape.vsize, sector_size=shape.sector_size, dest_kind=dest.kind, dest_block_size=bs,
        layer_count=len(layers), alloc_base=dest.alloc_base, file_size=dest.file_size, final_file_size=final,
        touched_blocks=np.concatenate(touched).astype(np.int64) if touched else i64,
        touched_sources=np.concatenate(sources).astype(np.int16) if sources else i64.astype(np.int16),
        copy_layer=cl.astype(np.int16), copy_src=cs, copy_dst=cd, copy_len=cn,
        zero_dst=zd, zero_len=zn, bat_blocks=bb[order].astype(np.int64), bat_states=bst.astype(np.uint8),
        bat_offsets=bo.astype(np.int64), sb_chunks=chunks.astype(np.int64), sb_offsets=sb_offsets,
        bitmap_blocks=mb.astype(np.int64), bitmap_bytes=mbits.astype(np.uint8), new_blocks=next_new,
        reused_blocks=sum(w.reused_blocks for w in windows))


def _all_absent(layers: Sequence[LayerArrays], start: int, end: int) -> bool:
    """True when every layer is known to hold nothing (NOT_PRESENT) in virtual bytes [start, end).

    Only layers whose ``states`` can say so without per-block arrays (``uniform_state``, a windowed BAT) are
    asked; plain arrays answer False (the window is planned as before).
    """
    for layer in layers:
        ask = getattr(layer.states, "uniform_state", None)
        if ask is None or end > layer.virtual_size:
            return False
        if ask(start // layer.block_size, ceil_div(end, layer.block_size)) != BS.NOT_PRESENT:
            return False
    return True


def _keep(ext: Extents, mask: np.ndarray) -> Extents:
    return Extents(ext.start[mask], ext.length[mask], ext.kind[mask], ext.layer[mask], ext.file_offset[mask])


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
