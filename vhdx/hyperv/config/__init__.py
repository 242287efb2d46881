"""Hyper-V VM configurations read offline: the binary storage format (``.vmcx``/``.vmrs``) and the older XML.

``read_config(path)`` returns a ``ConfigFile`` whichever the format; the key tree is the same shape for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vhdx.errors import FormatError
from vhdx.hyperv.config import layouts
from vhdx.hyperv.config.storage import LargeValue, StorageFile, parse_storage
from vhdx.hyperv.config.xmlconfig import MAX_XML_SIZE, parse_xml_config
from vhdx.io import ImageIO

__all__ = ["ConfigFile", "LargeValue", "read_config", "lookup"]


@dataclass
class ConfigFile:
    """A configuration file and its key tree.

    Attributes:
        path: the file.
        format: ``"vmcx"`` (binary storage, also ``.vmrs`` and ``data.vmcx``) or ``"xml"``.
        root: nested dicts of keys; leaves are int, float, str, bytes, bool or LargeValue.
        version: storage format version (None for XML).
        replayed_entries: replay-log entries applied in memory (0: the file was clean).
    """

    path: str
    format: str
    root: dict = field(default_factory=dict)
    version: int | None = None
    replayed_entries: int = 0

    def get(self, dotted: str, default=None):
        return lookup(self.root, dotted, default)


def lookup(tree: dict, dotted: str, default=None):
    """``tree["a"]["b"]`` for ``"a.b"``, or ``default`` when a key is missing or a value is not a node."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def read_config(path: str) -> ConfigFile:
    """Read a ``.vmcx``/``.vmrs``/``data.vmcx`` or an XML configuration (read-only; never writes)."""
    io = ImageIO.open(path)
    try:
        head = io.read_at(0, 4)
        if len(head) == 4 and int.from_bytes(head, "little") == layouts.STORAGE_SIGNATURE:
            storage: StorageFile = parse_storage(io)
            return ConfigFile(io.path, "vmcx", storage.root, storage.version, storage.replayed_entries)
        if io.size > MAX_XML_SIZE:
            raise FormatError("neither a Hyper-V storage file nor an XML configuration", structure="File header",
                              offset=0, path=io.path)
        return ConfigFile(io.path, "xml", parse_xml_config(io.read_at(0, io.size), io.path))
    finally:
        io.close()
