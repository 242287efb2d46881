"""Read a Hyper-V storage file (``.vmcx``, ``.vmrs``, the host's ``data.vmcx``) into a tree of keys.

The reader never writes: a file with entries left in its replay log is replayed in memory (like a dirty
VHDX log on a read-only open), after every entry and its data pass their checksums.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from vhdx.errors import ChecksumError, FormatError, UnsupportedError
from vhdx.hyperv.config import layouts as L
from vhdx.io import ImageIO, parse_bytes

MAX_DEPTH = 64  # real configurations nest about 8 deep; bounds the walk over hostile parent links
MAX_INLINE_FILE_OBJECT = 64 * 1024 * 1024  # larger file-object values stay on disk as LargeValue


@dataclass(frozen=True)
class LargeValue:
    """A value too large to load eagerly (saved memory in a ``.vmrs``): where it is, and its size."""

    offset: int
    size: int
    kind: str  # "string" or "array"


@dataclass
class StorageFile:
    """What a storage file holds.

    Attributes:
        path: the file.
        version: format version (0x400).
        sequence_number: of the header in use.
        header_index: 0 or 1, the header in use.
        replayed_entries: log entries replayed in memory (0 when the file was clean).
        root: the key tree; nodes are dicts, values int, float, str, bytes, bool or LargeValue.
    """

    path: str
    version: int
    sequence_number: int
    header_index: int
    replayed_entries: int
    root: dict = field(default_factory=dict)


def crc_of(data: bytes, checksum_offset: int) -> int:
    """CRC-32 of ``data`` with its 4-byte checksum field zeroed."""
    buf = bytearray(data)
    buf[checksum_offset : checksum_offset + 4] = bytes(4)
    return zlib.crc32(buf)


class _Source:
    """The file's bytes, with replayed log data laid over them (in memory only)."""

    def __init__(self, io: ImageIO) -> None:
        self.io = io
        self.path = io.path
        self.size = io.size
        self.patches: list[tuple[int, bytes]] = []

    def read(self, offset: int, length: int, structure: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FormatError(f"{length} bytes needed but the file ends at {self.size:#x} (truncated?)",
                              structure=structure, offset=offset, path=self.path)
        buf = bytearray(self.io.read_exact_at(offset, length, structure))
        end = offset + length
        for poff, pdata in self.patches:
            lo, hi = max(offset, poff), min(end, poff + len(pdata))
            if lo < hi:
                buf[lo - offset : hi - offset] = pdata[lo - poff : hi - poff]
        return bytes(buf)

    def layout(self, layout, offset: int, structure: str, data: bytes | None = None):
        data = self.read(offset, layout.sizeof(), structure) if data is None else data
        return parse_bytes(layout, data, offset=offset, structure=structure, path=self.path)


def read_storage(path: str) -> StorageFile:
    """Parse the storage file at ``path`` (opened read-only)."""
    io = ImageIO.open(path)
    try:
        return parse_storage(io)
    finally:
        io.close()


def parse_storage(io: ImageIO) -> StorageFile:
    src = _Source(io)
    index, header = _pick_header(src)
    if header.version != L.SUPPORTED_VERSION:
        raise UnsupportedError(f"storage format version {header.version:#x} (only {L.SUPPORTED_VERSION:#x} is known)",
                               structure=f"Storage header {index + 1}", offset=L.HEADER_OFFSETS[index],
                               path=src.path)
    replayed = _replay_log(src, header)
    objects = _object_entries(src)
    tables, file_objects = _load_tables(src, objects)
    root = _build_tree(src, tables, file_objects)
    return StorageFile(src.path, header.version, header.sequence_number, index, replayed, root)


def _pick_header(src: _Source):
    """The valid header with the higher sequence number (a torn update leaves the other one valid)."""
    found, problems = [], []
    for i, off in enumerate(L.HEADER_OFFSETS):
        name = f"Storage header {i + 1}"
        try:
            raw = src.read(off, L.StorageHeader.sizeof(), name)
            header = src.layout(L.StorageHeader, off, name, raw)
        except FormatError as exc:
            problems.append(exc)
            continue
        if crc_of(raw, L.HEADER_CHECKSUM_OFFSET) != header.checksum:
            problems.append(ChecksumError("checksum mismatch", structure=name, offset=off, path=src.path))
            continue
        found.append((header.sequence_number, i, header))
    if not found:
        first = problems[0]
        raise type(first)(f"no valid storage header ({first.message}; not a Hyper-V configuration file?)",
                          structure=first.structure, offset=first.offset, path=src.path)
    _seq, i, header = max(found, key=lambda t: (t[0], -t[1]))
    return i, header


def _replay_log(src: _Source, header) -> int:
    """Lay the log's pending entries over the file's bytes, in order; return how many there were."""
    log_off, log_size = header.replay_log_offset, header.replay_log_size
    name = "Replay log"
    raw = src.read(log_off, L.ReplayLogHeader.sizeof(), name)
    log = src.layout(L.ReplayLogHeader, log_off, name, raw)
    if crc_of(raw, L.REPLAY_LOG_CHECKSUM_OFFSET) != log.checksum:
        raise ChecksumError("checksum mismatch", structure=name, offset=log_off, path=src.path)
    count = log.num_entries
    table_end = L.ReplayLogHeader.sizeof() + count * L.ReplayLogEntry.sizeof()
    if count > log.max_entries or table_end > log_size:
        raise FormatError(f"{count} entries do not fit (at most {log.max_entries}, log size {log_size:#x})",
                          structure=name, offset=log_off, path=src.path)
    pending = []
    for n in range(count):
        eoff = log_off + L.ReplayLogHeader.sizeof() + n * L.ReplayLogEntry.sizeof()
        ename = f"Replay log entry {n}"
        raw = src.read(eoff, L.ReplayLogEntry.sizeof(), ename)
        entry = src.layout(L.ReplayLogEntry, eoff, ename, raw)
        if crc_of(raw, L.REPLAY_ENTRY_CHECKSUM_OFFSET) != entry.checksum:
            raise ChecksumError("checksum mismatch", structure=ename, offset=eoff, path=src.path)
        if entry.data_offset < table_end or entry.data_offset + entry.size > log_size:
            raise FormatError(f"data at log offset {entry.data_offset:#x} (+{entry.size:#x}) lies outside the log",
                              structure=ename, offset=eoff, path=src.path)
        if entry.offset + entry.size > src.size:
            raise FormatError(f"target {entry.offset:#x} (+{entry.size:#x}) lies beyond the end of the file",
                              structure=ename, offset=eoff, path=src.path)
        data = src.read(log_off + entry.data_offset, entry.size, ename + " data")
        if zlib.crc32(data) != entry.data_checksum:
            raise ChecksumError("data checksum mismatch (torn log write?)", structure=ename, offset=eoff,
                                path=src.path)
        pending.append((entry.offset, data))
    # Every entry is checked before any is applied: a torn log changes nothing.
    src.patches.extend(pending)
    return count


def _object_entries(src: _Source) -> list:
    """Allocated entries of the object table and of the tables it chains to."""
    queue, seen, entries = [L.OBJECT_TABLE_OFFSET], set(), []
    while queue:
        off = queue.pop(0)
        if off in seen:
            continue
        seen.add(off)
        table = src.layout(L.ObjectTableHeader, off, "Object table")
        esize = L.ObjectTableEntry.sizeof()
        if off + 8 + table.num_entries * esize > src.size:
            raise FormatError(f"{table.num_entries} entries run past the end of the file", structure="Object table",
                              offset=off, path=src.path)
        blob = src.read(off + 8, table.num_entries * esize, "Object table")
        for n in range(table.num_entries):
            eoff = off + 8 + n * esize
            raw = blob[n * esize : (n + 1) * esize]
            entry = src.layout(L.ObjectTableEntry, eoff, f"Object table entry {n}", raw)
            if not entry.allocated:
                continue
            if crc_of(raw, L.OBJECT_ENTRY_CHECKSUM_OFFSET) != entry.checksum:
                raise ChecksumError("checksum mismatch", structure=f"Object table entry {n}", offset=eoff,
                                    path=src.path)
            if entry.type not in L.ObjectType.__members__.values():
                raise UnsupportedError(f"unknown object type {entry.type}", structure=f"Object table entry {n}",
                                       offset=eoff, path=src.path)
            if entry.type == L.ObjectType.OBJECT_TABLE:
                queue.append(entry.offset)
            entries.append((eoff, entry))
    return entries


@dataclass
class _Entry:
    offset: int  # within its table
    file_offset: int
    vtype: int
    flags: int
    key: str
    value: bytes  # raw value bytes (inline)
    parent_table: int
    parent_offset: int


def _load_tables(src: _Source, objects):
    """Key tables by index (the highest sequence number of each index wins) and file objects by offset."""
    best: dict[int, tuple[int, list[_Entry]]] = {}
    file_objects: dict[int, int] = {}
    for eoff, obj in objects:
        if obj.type == L.ObjectType.FILE:
            if obj.offset + obj.size > src.size:
                raise FormatError(f"file object {obj.offset:#x} (+{obj.size:#x}) runs past the end of the file",
                                  structure="Object table entry", offset=eoff, path=src.path)
            file_objects[obj.offset] = obj.size
        elif obj.type == L.ObjectType.KEY_TABLE:
            if obj.size > 16 * L.KEY_TABLE_SIZE or obj.size < L.KeyTableHeader.sizeof():
                raise FormatError(f"key table size {obj.size:#x} out of range", structure="Object table entry",
                                  offset=eoff, path=src.path)
            index, seq, entries = _key_table(src, obj.offset, obj.size)
            if index not in best or seq > best[index][0]:
                best[index] = (seq, entries)
    return {index: entries for index, (_seq, entries) in best.items()}, file_objects


def _key_table(src: _Source, offset: int, size: int):
    name = "Key table"
    raw = src.read(offset, size, name)
    head = src.layout(L.KeyTableHeader, offset, name, raw[: L.KeyTableHeader.sizeof()])
    if crc_of(raw[: L.KeyTableHeader.sizeof()], L.KEY_TABLE_CHECKSUM_OFFSET) != head.checksum:
        raise ChecksumError("checksum mismatch", structure=f"Key table {head.index}", offset=offset, path=src.path)
    entries = []
    pos, hsize = L.KeyTableHeader.sizeof(), L.KeyEntryHeader.sizeof()
    while pos + hsize <= size:
        ename, eoff = f"Key table {head.index} entry", offset + pos
        eh = src.layout(L.KeyEntryHeader, eoff, ename, raw[pos : pos + hsize])
        if eh.size == 0:
            break
        if eh.size < hsize or pos + eh.size > size:
            raise FormatError(f"entry size {eh.size:#x} does not fit the table", structure=ename, offset=eoff,
                              path=src.path)
        body = raw[pos : pos + eh.size]
        vtype, flags = eh.type & 0xFF, eh.type >> 8
        if vtype != L.ValueType.FREE:
            if vtype not in L.ValueType.__members__.values() or vtype == L.ValueType.UNKNOWN:
                raise UnsupportedError(f"unknown value type {vtype}", structure=ename, offset=eoff, path=src.path)
            if flags & ~L.KNOWN_FLAGS:
                raise UnsupportedError(f"unknown entry flags {flags:#x}", structure=ename, offset=eoff, path=src.path)
            data = body[hsize:]
            if eh.data_offset < 1 or eh.data_offset > len(data) or data[eh.data_offset - 1] != 0:
                raise FormatError(f"key name length {eh.data_offset} does not fit", structure=ename, offset=eoff,
                                  path=src.path)
            span = hsize + eh.data_offset + value_size(vtype, flags, data[eh.data_offset :])
            if span > len(body):
                raise FormatError(f"value runs {span - len(body)} bytes past the entry", structure=ename,
                                  offset=eoff, path=src.path)
            if crc_of(body[:span], L.KEY_ENTRY_CHECKSUM_OFFSET) != eh.checksum:
                raise ChecksumError("checksum mismatch", structure=ename, offset=eoff, path=src.path)
            try:
                key = data[: eh.data_offset - 1].decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError("key name is not UTF-8", structure=ename, offset=eoff, path=src.path) from None
            entries.append(_Entry(pos, eoff, vtype, flags, key, data[eh.data_offset :], eh.parent_table_index,
                                  eh.parent_offset))
        pos += eh.size
    return head.index, head.sequence_number, entries


def value_size(vtype: int, flags: int, value: bytes) -> int:
    """Bytes of the value the entry checksum covers (after the key name): the entry may hold slack after it."""
    if flags & L.FILE_OBJECT_FLAG or vtype == L.ValueType.NODE:
        return 12
    if vtype in (L.ValueType.STRING, L.ValueType.ARRAY):
        return 4 + (struct.unpack_from("<I", value)[0] if len(value) >= 4 else 0)
    return 4 if vtype == L.ValueType.BOOL else 8


def _decode(src: _Source, entry: _Entry, file_objects: dict[int, int]):
    name, where = f"Key {entry.key!r}", entry.file_offset
    vt, data = entry.vtype, entry.value

    def need(n: int) -> None:
        if len(data) < n:
            raise FormatError(f"value needs {n} bytes, entry holds {len(data)}", structure=name, offset=where,
                              path=src.path)

    if entry.flags & L.FILE_OBJECT_FLAG:
        if vt not in (L.ValueType.STRING, L.ValueType.ARRAY):
            raise FormatError(f"a {L.ValueType(vt).name} value cannot live in a file object", structure=name,
                              offset=where, path=src.path)
        need(12)
        ptr = parse_bytes(L.FileObjectPointer, data[:12], offset=where, structure=name, path=src.path)
        if ptr.offset not in file_objects or ptr.size > file_objects[ptr.offset]:
            raise FormatError(f"file object {ptr.offset:#x} (+{ptr.size:#x}) is not in the object table",
                              structure=name, offset=where, path=src.path)
        kind = "string" if vt == L.ValueType.STRING else "array"
        if ptr.size > MAX_INLINE_FILE_OBJECT:
            return LargeValue(ptr.offset, ptr.size, kind)
        raw = src.read(ptr.offset, ptr.size, name)
    elif vt in (L.ValueType.STRING, L.ValueType.ARRAY):
        need(4)
        (length,) = struct.unpack_from("<I", data)
        need(4 + length)
        raw = data[4 : 4 + length]
    if vt == L.ValueType.STRING:
        try:
            return raw.decode("utf-16-le")
        except UnicodeDecodeError:
            raise FormatError("string is not UTF-16", structure=name, offset=where, path=src.path) from None
    if vt == L.ValueType.ARRAY:
        return raw
    if vt == L.ValueType.BOOL:
        need(4)
        return struct.unpack_from("<I", data)[0] != 0
    need(8)
    return struct.unpack_from({L.ValueType.INT: "<q", L.ValueType.UINT: "<Q", L.ValueType.DOUBLE: "<d"}[vt], data)[0]


def _build_tree(src: _Source, tables: dict[int, list[_Entry]], file_objects: dict[int, int]) -> dict:
    """Link every entry to its parent node; the tree is what the root keys reach."""
    by_place = {(index, e.offset): e for index, entries in tables.items() for e in entries}
    children: dict[int, dict[str, _Entry]] = {}  # id(node entry) -> its children by key
    root: dict[str, _Entry] = {}
    for entries in tables.values():
        for e in entries:
            if e.parent_table == 0:
                root[e.key] = e
                continue
            parent = by_place.get((e.parent_table, e.parent_offset))
            if parent is None or parent.vtype != L.ValueType.NODE:
                raise FormatError(f"parent {e.parent_table}:{e.parent_offset:#x} is not a node",
                                  structure=f"Key {e.key!r}", offset=e.file_offset, path=src.path)
            children.setdefault(id(parent), {})[e.key] = e

    def materialise(kids: dict[str, _Entry], depth: int) -> dict:
        if depth > MAX_DEPTH:
            raise FormatError(f"keys nest deeper than {MAX_DEPTH} levels", structure="Key tree", path=src.path)
        out = {}
        for key, e in kids.items():
            if e.vtype == L.ValueType.NODE:
                out[key] = materialise(children.get(id(e), {}), depth + 1)
            else:
                out[key] = _decode(src, e, file_objects)
        return out

    return materialise(root, 0)
