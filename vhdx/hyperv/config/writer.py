"""Write Hyper-V storage files (``.vmcx``) from a key tree, for fixture VM folders and tests.

Never for users' files: this project does not edit a VM's configuration.

The output follows the samples' arrangement: two headers, the object table at 0x2000, one 4 KiB key table per
index from 0x3000, file objects for large values, and the replay log last. A dirty file (entries left in the
log) can be made with ``with_pending_log``.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

from vhdx.errors import InvalidRequestError
from vhdx.hyperv.config import layouts as L

PAGE = 0x1000
OBJECT_TABLE_ENTRIES = 227  # fills the 4 KiB page, as in the samples
LOG_SIZE = 0x5000
LOG_MAX_ENTRIES = 0x91


def stamp(buf: bytearray, checksum_offset: int, span: int | None = None) -> None:
    """Write the CRC-32 of ``buf[:span]`` (checksum field zeroed) into its checksum field."""
    buf[checksum_offset : checksum_offset + 4] = bytes(4)
    crc = zlib.crc32(bytes(buf[: len(buf) if span is None else span]))
    buf[checksum_offset : checksum_offset + 4] = struct.pack("<I", crc)


def _value_bytes(value) -> tuple[int, bytes]:
    """(ValueType, inline value bytes) of a Python value."""
    if isinstance(value, bool):
        return L.ValueType.BOOL, struct.pack("<I", int(value))
    if isinstance(value, int):
        if -(1 << 63) <= value < (1 << 63):
            return L.ValueType.INT, struct.pack("<q", value)
        return L.ValueType.UINT, struct.pack("<Q", value)
    if isinstance(value, float):
        return L.ValueType.DOUBLE, struct.pack("<d", value)
    if isinstance(value, str):
        raw = value.encode("utf-16-le")
        return L.ValueType.STRING, struct.pack("<I", len(raw)) + raw
    if isinstance(value, (bytes, bytearray)):
        return L.ValueType.ARRAY, struct.pack("<I", len(value)) + bytes(value)
    raise InvalidRequestError(f"cannot store a {type(value).__name__} in a configuration")


@dataclass
class _Table:
    index: int
    body: bytearray


class _Packer:
    def __init__(self, file_object_base: int) -> None:
        self.tables: list[_Table] = []
        self.file_objects: list[tuple[int, bytes]] = []  # (offset, data), offsets fixed up later
        self.next_file_object = file_object_base
        self.sequence = 0

    def place(self, entry: bytearray) -> tuple[int, int]:
        # Room is left for a zeroed entry header after the last entry: it ends the table for every reader.
        if not self.tables or len(self.tables[-1].body) + len(entry) + L.KeyEntryHeader.sizeof() > PAGE:
            self.tables.append(_Table(len(self.tables) + 1, bytearray(L.KeyTableHeader.sizeof())))
        table = self.tables[-1]
        where = (table.index, len(table.body))
        table.body += entry
        return where

    def entry(self, key: str, value, parent: tuple[int, int]) -> tuple[int, int]:
        name = key.encode("utf-8") + b"\0"
        if len(name) > 255 or "\0" in key:
            raise InvalidRequestError(f"key {key!r} cannot be stored (at most 254 UTF-8 bytes, no NUL)")
        flags = 0
        if isinstance(value, dict):
            vtype, raw = L.ValueType.NODE, bytes(8) + struct.pack("<I", self.sequence)
        else:
            vtype, raw = _value_bytes(value)
            if vtype in (L.ValueType.STRING, L.ValueType.ARRAY) and len(raw) - 4 >= L.INLINE_VALUE_LIMIT:
                data = raw[4:]
                offset = self.next_file_object
                self.file_objects.append((offset, data))
                self.next_file_object += -(-max(len(data), 1) // PAGE) * PAGE
                flags, raw = L.FILE_OBJECT_FLAG, struct.pack("<IQ", len(data), offset)
        self.sequence += 1
        header = L.KeyEntryHeader.build(dict(type=vtype | flags << 8, size=0, parent_table_index=parent[0],
                                             parent_offset=parent[1], checksum=0,
                                             insertion_sequence=self.sequence, data_offset=len(name)))
        entry = bytearray(header + name + raw)
        entry[2:6] = struct.pack("<I", len(entry))
        stamp(entry, L.KEY_ENTRY_CHECKSUM_OFFSET)
        return self.place(entry)

    def tree(self, node: dict, parent: tuple[int, int]) -> None:
        for key, value in node.items():
            where = self.entry(key, value, parent)
            if isinstance(value, dict):
                self.tree(value, where)


def build_storage(tree: dict, *, sequence_number: int = 2) -> bytes:
    """The bytes of a clean storage file holding ``tree`` (nested dicts of int/float/str/bytes/bool)."""
    if not isinstance(tree, dict):
        raise InvalidRequestError("a configuration is a dict of keys")
    # Key tables first need their count to know where file objects start: pack twice (cheap, small trees).
    probe = _Packer(0)
    probe.tree(tree, (0, 0))
    tables_at = 0x3000
    packer = _Packer(tables_at + max(len(probe.tables), 1) * PAGE)
    packer.tree(tree, (0, 0))
    log_offset = packer.next_file_object
    out = bytearray(log_offset + LOG_SIZE)
    objects = []
    for n, table in enumerate(packer.tables):
        head = bytearray(L.KeyTableHeader.build(dict(index=table.index, sequence_number=1, checksum=0)))
        stamp(head, L.KEY_TABLE_CHECKSUM_OFFSET)
        table.body[: len(head)] = head
        offset = tables_at + n * PAGE
        out[offset : offset + len(table.body)] = table.body
        objects.append((L.ObjectType.KEY_TABLE, offset, PAGE))
    for offset, data in packer.file_objects:
        out[offset : offset + len(data)] = data
        objects.append((L.ObjectType.FILE, offset, -(-max(len(data), 1) // PAGE) * PAGE))
    if len(objects) > OBJECT_TABLE_ENTRIES:
        raise InvalidRequestError(f"tree too large for one object table ({len(objects)} objects)")
    table = bytearray(L.ObjectTableHeader.build(dict(num_entries=OBJECT_TABLE_ENTRIES)))
    for otype, offset, size in objects:
        entry = bytearray(L.ObjectTableEntry.build(dict(type=otype, checksum=0, offset=offset, size=size,
                                                        allocated=1)))
        stamp(entry, L.OBJECT_ENTRY_CHECKSUM_OFFSET)
        table += entry
    out[L.OBJECT_TABLE_OFFSET : L.OBJECT_TABLE_OFFSET + len(table)] = table
    out[log_offset : log_offset + L.ReplayLogHeader.sizeof()] = _log_header(0)
    for i, seq in enumerate((sequence_number, sequence_number - 1)):
        head = bytearray(L.StorageHeader.build(dict(checksum=0, sequence_number=seq, version=L.SUPPORTED_VERSION,
                                                    reserved=0, alignment=PAGE, replay_log_offset=log_offset,
                                                    replay_log_size=LOG_SIZE, header_size=PAGE)))
        stamp(head, L.HEADER_CHECKSUM_OFFSET)
        out[L.HEADER_OFFSETS[i] : L.HEADER_OFFSETS[i] + len(head)] = head
    return bytes(out)


def _log_header(count: int) -> bytearray:
    head = bytearray(L.ReplayLogHeader.build(dict(checksum=0, num_entries=count, reserved1=0,
                                                  max_entries=LOG_MAX_ENTRIES, reserved2=bytes(17))))
    stamp(head, L.REPLAY_LOG_CHECKSUM_OFFSET)
    return head


def with_pending_log(image: bytes, writes: list[tuple[int, bytes]]) -> bytes:
    """``image`` with ``writes`` (file offset, bytes) left in its replay log, not yet applied: a dirty file.

    The log is the one the first header names; data is packed from one page into the log.
    """
    head = L.StorageHeader.parse(image[: L.StorageHeader.sizeof()])
    log_offset, log_size = head.replay_log_offset, head.replay_log_size
    out = bytearray(image)
    out[log_offset : log_offset + L.ReplayLogHeader.sizeof()] = _log_header(len(writes))
    data_at = PAGE
    for n, (target, data) in enumerate(writes):
        if data_at + len(data) > log_size:
            raise InvalidRequestError("the writes do not fit in the replay log")
        entry = bytearray(L.ReplayLogEntry.build(dict(offset=target, size=len(data), data_offset=data_at,
                                                      reserved=0, checksum=0, data_checksum=zlib.crc32(data))))
        stamp(entry, L.REPLAY_ENTRY_CHECKSUM_OFFSET)
        at = log_offset + L.ReplayLogHeader.sizeof() + n * L.ReplayLogEntry.sizeof()
        out[at : at + len(entry)] = entry
        out[log_offset + data_at : log_offset + data_at + len(data)] = data
        data_at += len(data)
    return bytes(out)


def write_storage(path: str, tree: dict, **kw) -> None:
    """Write a new storage file at ``path`` (refuses to replace an existing file)."""
    data = build_storage(tree, **kw)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
