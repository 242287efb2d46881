"""The BAT rules of [MS-VHDX] §2.5.1, judged one window of whole chunks at a time (pure numpy).

One rule set for every caller: the loader refuses a file by the first rule that stops the reader
(``BatWindow.refusal``), ``check`` reports every broken rule as a finding, repair plans by the same codes.

References: [MS-VHDX] §2.5.1 (BAT entries), §2.5.1.1 (payload states), §2.5.1.2 (sector bitmap states).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from vhdx.findings import Code, Problem, Severity
from vhdx.format import constants as c
from vhdx.lazy import np
from vhdx.structures.bat import (
    WINDOW_ENTRIES,
    Geometry,
    allocated_mask,
    entry_offset,
    entry_offsets,
    payload_missing_bytes,
    payload_missing_bytes_of,
)


def windows(geometry: Geometry, n_entries: int, window_entries: int = WINDOW_ENTRIES):
    """(first, end) BAT index ranges of whole chunks covering ``n_entries`` entries."""
    stride = geometry.chunk_ratio + 1
    step = max(1, window_entries // stride) * stride
    for lo in range(0, n_entries, step):
        yield lo, min(n_entries, lo + step)


def structure_spans(log_offset: int, log_length: int, regions) -> list[tuple[str, int, int]]:
    """(name, start, end) of every structure no block may overlap: header section, log, each region."""
    spans = [("the header section", 0, c.HEADER_SECTION_SIZE)]
    if log_length:
        spans.append(("the log", log_offset, log_offset + log_length))
    spans.extend((f"the {e.name} region", e.file_offset, e.end) for e in regions)
    return spans


@dataclass(frozen=True)
class BatRule:
    """How one BAT rule is reported: its code, severity, whether repair fixes it and whether it stops the reader."""

    code: Code
    severity: Severity
    refuses_open: bool
    repairable: bool = False


# The BAT rules of §2.5.1, in the order they are reported. A sector bitmap entry in a fixed or dynamic disk is
# never read, so it does not stop the reader; a PRESENT one is an error all the same (QEMU takes it for a block).
RESERVED_BITS = BatRule(Code.BAT_RESERVED_BITS, Severity.WARNING, False, True)
STATE_ILLEGAL = BatRule(Code.BAT_STATE_ILLEGAL, Severity.ERROR, True)
SB_PRESENT_IN_NON_DIFFERENCING = BatRule(Code.BAT_SB_IN_NON_DIFFERENCING, Severity.ERROR, False, True)
SB_STRAY_IN_NON_DIFFERENCING = BatRule(Code.BAT_SB_IN_NON_DIFFERENCING, Severity.WARNING, False, True)
BEYOND_EOF = BatRule(Code.BAT_BEYOND_EOF, Severity.ERROR, True)
SALVAGED_BEYOND_EOF = BatRule(Code.BAT_BEYOND_EOF, Severity.ERROR, False)
OVERLAPS_STRUCTURE = BatRule(Code.BAT_OVERLAPS_STRUCTURE, Severity.ERROR, True)
BITMAP_MISSING = BatRule(Code.BAT_BITMAP_MISSING, Severity.ERROR, True)


def entry_name(geometry: Geometry, index: int) -> str:
    """``BAT entry 17 (payload block 16)`` or ``BAT entry 4096 (sector bitmap block 0)``."""
    stride = geometry.chunk_ratio + 1
    if index % stride == geometry.chunk_ratio:
        return f"BAT entry {index} (sector bitmap block {index // stride})"
    return f"BAT entry {index} (payload block {index - index // stride})"


@dataclass
class BatWindow:
    """The examined entries of one window of whole chunks, decoded, and the rules each breaks.

    Only entries that need a look are kept (a payload entry 0..3 and a zero bitmap entry are always fine);
    ``hits`` lists, per rule, the BAT indexes that break it and a message for each.
    """

    geometry: Geometry
    bat_offset: int
    index: np.ndarray  # BAT index of each examined entry
    raw: np.ndarray
    states: np.ndarray
    offsets: np.ndarray
    is_sb: np.ndarray
    block: np.ndarray  # payload block number (meaningful where ~is_sb)
    payload: np.ndarray  # a payload entry of a block the disk has
    length: np.ndarray  # bytes each block owns in the file
    owned: np.ndarray  # present: owns its file space
    kept: np.ndarray  # not present but keeping the offset it had (a writer may reuse the space)
    missing: np.ndarray  # virtual disk bytes of a payload block past the end of the file
    beyond: np.ndarray
    overlapping: np.ndarray
    # Per rule: the BAT indexes that break it and the message of the j-th of them.
    hits: list[tuple[BatRule, np.ndarray, Callable[[int], str]]] = field(default_factory=list)

    def hit(self, rule: BatRule, mask: np.ndarray, message: Callable[[int], str]) -> None:
        """Record the examined entries of ``mask`` as breaking ``rule`` (``message`` takes a position in them)."""
        where = np.flatnonzero(mask)
        self.hits.append((rule, self.index[where], lambda j: message(int(where[j]))))

    def _problem(self, rule: BatRule, bat_index: int, message: str) -> Problem:
        return Problem(rule.code, entry_name(self.geometry, bat_index), self.bat_offset + bat_index * c.BAT_ENTRY_SIZE,
                       message, rule.severity, rule.repairable, rule.refuses_open)

    def problems(self, limit: int | None = None) -> list[Problem]:
        """The broken rules as Problems, at most ``limit`` per rule (all when None)."""
        return [self._problem(rule, int(indexes[j]), message(j))
                for rule, indexes, message in self.hits for j in range(len(indexes[:limit]))]

    def counts(self) -> list[tuple[BatRule, int]]:
        """How many entries break each rule."""
        return [(rule, len(indexes)) for rule, indexes, _ in self.hits]

    def refusal(self) -> Problem | None:
        """The first broken rule that stops the reader (with how many more entries break it), or None."""
        refusals = Refusals()
        refusals.add(self)
        return refusals.refusal()


# The rules that stop the reader, in the order a refusal names them (the first one broken anywhere wins).
REFUSAL_ORDER = (STATE_ILLEGAL, BEYOND_EOF, OVERLAPS_STRUCTURE, BITMAP_MISSING)


@dataclass
class Refusals:
    """The refusal one pass over the whole BAT gives, gathered window by window: per rule, its first hit and count."""

    first: dict[BatRule, Problem] = field(default_factory=dict)
    counts: dict[BatRule, int] = field(default_factory=dict)

    def add(self, window: BatWindow) -> None:
        for rule, indexes, message in window.hits:
            if rule.refuses_open and len(indexes):
                if rule not in self.first:
                    self.first[rule] = window._problem(rule, int(indexes[0]), message(0))
                self.counts[rule] = self.counts.get(rule, 0) + len(indexes)

    def refusal(self) -> Problem | None:
        for rule in REFUSAL_ORDER:
            problem = self.first.get(rule)
            if problem is not None:
                more = self.counts[rule] - 1
                return replace(problem, message=problem.message + (f" (and {more} more)" if more else ""))
        return None


# Payload states legal in a disk, by has_parent (PARTIALLY_PRESENT only in a differencing disk).
_LEGAL_PAYLOAD_STATES = (frozenset(s.value for s in c.BatState if s != c.BatState.PARTIALLY_PRESENT),
                         frozenset(s.value for s in c.BatState))


@functools.cache
def _by_state_tables() -> tuple[np.ndarray, np.ndarray]:
    """The rules above and the states that read as zeros as lookup tables by state (3 bits), for whole windows.

    Made on first use: a BAT of one repeated entry is judged by ``uniform_stops_no_reader`` without numpy.
    """
    legal = np.zeros((2, 8), dtype=bool)
    for has_parent, states in enumerate(_LEGAL_PAYLOAD_STATES):
        legal[has_parent, sorted(states)] = True
    zero_reading = np.zeros(8, dtype=bool)
    zero_reading[list(c.ZERO_READING_STATES)] = True
    return legal, zero_reading


def uniform_stops_no_reader(entry: int, geometry: Geometry) -> bool:
    """Whether a window whose payload entries all hold ``entry`` (and no sector bitmap entry) reads fine.

    The rules of one repeated value, judged once instead of per entry: a state legal in this disk type that owns
    no file space (not FULLY/PARTIALLY_PRESENT) can break RESERVED_BITS only, a warning. Nothing lies beyond the
    end of the file or over a structure, and no partially present block needs a sector bitmap.
    """
    state = entry & c.BAT_STATE_MASK
    owns = state in (c.BatState.FULLY_PRESENT, c.BatState.PARTIALLY_PRESENT)
    return state in _LEGAL_PAYLOAD_STATES[geometry.has_parent] and not owns


def exception_stops_no_reader(geometry: Geometry, index: int, entry: int, file_size: int,
                              structures: list[tuple[str, int, int]]) -> bool:
    """Whether BAT entry ``index`` holding ``entry`` surely breaks no rule that stops the reader; pure Python.

    For the few entries that differ in a window of one repeated entry (``RawWindow.exceptions``): the loader
    then judges the window without numpy. It answers yes only for a payload entry of a block of the disk in a
    legal state that owns no file space, or that is fully present inside the file (``payload_missing_bytes_of``)
    and over no structure, exactly as ``bat_problems`` decides those rules; for anything else (a sector bitmap
    entry, a partially present block, a slot past the disk) it answers no and ``bat_problems`` judges the
    window. Reserved bits only ever give a warning, which the loader does not act on.
    """
    block = geometry.payload_block_of(index)
    state = entry & c.BAT_STATE_MASK
    legal = state in _LEGAL_PAYLOAD_STATES[geometry.has_parent]
    if block is None or not legal or state == c.BatState.PARTIALLY_PRESENT:
        return False
    if state != c.BatState.FULLY_PRESENT:
        return True
    offset = entry_offset(entry)
    if payload_missing_bytes_of(geometry, block, offset, file_size):
        return False
    end = min(offset + geometry.block_size, file_size)
    return not any(offset < hi and end > lo for _name, lo, hi in structures)


def bat_problems(geometry: Geometry, first_index: int, raw: np.ndarray, file_size: int, *, bat_offset: int,
                 structures: list[tuple[str, int, int]], disk_label: str, salvage: bool = False) -> BatWindow:
    """Judge a window of raw BAT entries (whole chunks from ``first_index``) against §2.5.1; pure numpy.

    Rules: a state legal for the entry's kind and the disk type; no reserved bit; a present block's virtual disk
    bytes inside the file (``payload_missing_bytes``: the tail past the disk's end may be missing) and not over a
    structure (``structure_spans``); a sector bitmap block for every chunk with partially present blocks
    (differencing); no sector bitmap entry other than NOT_PRESENT in a fixed or dynamic disk.

    Args:
        geometry: the disk's geometry.
        first_index: BAT index of ``raw[0]`` (a multiple of chunk_ratio + 1).
        raw: the raw little-endian entries of the window.
        file_size: the file size as the reader sees it.
        bat_offset: file offset of the BAT (to name entries).
        structures: spans no block may overlap.
        disk_label: "fixed", "dynamic" or "differencing" (for messages).
        salvage: payload missing from the file is read as zeros (``--salvage``): not a refusal.
    """
    g = geometry
    stride = g.chunk_ratio + 1
    diff = g.has_parent
    active = raw > 3
    sb_pos = np.arange((g.chunk_ratio - first_index) % stride, len(raw), stride)
    active[sb_pos] = raw[sb_pos] != 0
    pos = np.flatnonzero(active)
    raw = raw[pos]
    index = pos.astype(np.int64) + first_index
    is_sb = index % stride == g.chunk_ratio
    block = index - index // stride
    states = (raw & np.uint64(c.BAT_STATE_MASK)).astype(np.uint8)
    offsets = entry_offsets(raw)
    payload = ~is_sb & (block < g.data_blocks)
    # A block owns block_size bytes (Hyper-V allocates the last block whole even when the disk ends inside it).
    length = np.where(is_sb, c.SECTOR_BITMAP_BLOCK_SIZE, g.block_size).astype(np.int64)
    present = allocated_mask(states)
    owned = (payload & present) | (is_sb & (states == c.SbState.PRESENT) & diff)
    legal_by_state, zero_reading = _by_state_tables()
    kept = payload & zero_reading[states] & (offsets > 0)
    if not diff:
        kept |= is_sb & (states != c.SbState.NOT_PRESENT) & (offsets > 0)
    missing = np.where(owned & ~is_sb, payload_missing_bytes(g, block, offsets, file_size), 0)
    beyond = owned & np.where(is_sb, offsets + length > file_size, missing > 0)
    end = np.minimum(offsets + length, file_size)
    overlapping = np.zeros(len(raw), dtype=bool)
    names = np.full(len(raw), -1, dtype=np.int16)
    for k, (_name, lo, hi) in enumerate(structures):
        hit = owned & (offsets < hi) & (end > lo)
        names[hit & ~overlapping] = k
        overlapping |= hit
    w = BatWindow(g, bat_offset, index, raw, states, offsets, is_sb, block, payload, length, owned, kept, missing,
                  beyond, overlapping)
    label, add = disk_label, w.hit

    reserved = (raw & np.uint64(c.BAT_RESERVED_MASK)) != 0
    add(RESERVED_BITS, reserved & (payload | is_sb),
        lambda i: f"reserved bits {int(raw[i]) & c.BAT_RESERVED_MASK:#x} are set")
    illegal = payload & ~legal_by_state[int(diff)][states]
    if diff:
        illegal |= is_sb & (states != c.SbState.NOT_PRESENT) & (states != c.SbState.PRESENT)
    add(STATE_ILLEGAL, illegal, lambda i: f"state {states[i]} is not legal here in a {label} disk")
    if not diff:
        stray = is_sb & (states != c.SbState.NOT_PRESENT)
        for rule, mask in ((SB_PRESENT_IN_NON_DIFFERENCING, stray & (states == c.SbState.PRESENT)),
                           (SB_STRAY_IN_NON_DIFFERENCING, stray & (states != c.SbState.PRESENT))):
            add(rule, mask, lambda i: f"sector bitmap entry has state {states[i]} in a {label} disk")
    add(SALVAGED_BEYOND_EOF if salvage else BEYOND_EOF, beyond & ~is_sb,
        lambda i: f"block at {offsets[i]:#x} lies beyond the end of the file ({file_size:#x}); truncated?")
    add(BEYOND_EOF, beyond & is_sb,
        lambda i: f"sector bitmap block at {offsets[i]:#x} lies beyond the end of the file ({file_size:#x})")
    add(OVERLAPS_STRUCTURE, overlapping,
        lambda i: f"block at {offsets[i]:#x} overlaps {structures[names[i]][0]}")
    if diff:
        chunk = index // stride
        first_chunk = first_index // stride
        n_chunks = -(-(first_index + len(active)) // stride) - first_chunk
        partial = np.zeros(n_chunks, dtype=bool)
        partial[chunk[payload & (states == c.BatState.PARTIALLY_PRESENT)] - first_chunk] = True
        usable = np.zeros(n_chunks, dtype=bool)
        usable[chunk[is_sb & (states == c.SbState.PRESENT) & ~beyond & ~overlapping] - first_chunk] = True
        chunks = np.flatnonzero(partial & ~usable) + first_chunk
        w.hits.append((BITMAP_MISSING, g.bitmap_index(chunks),
                       lambda j: f"chunk {chunks[j]} has partially present blocks but no usable sector bitmap block"))
    return w
