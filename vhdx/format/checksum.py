"""CRC-32C (Castagnoli) over a structure whose own 4-byte checksum field counts as zero.

The checksum always spans the whole structure (4 KiB header, 64 KiB region table, EntryLength bytes
of a log entry), reserved bytes included.

References: [MS-VHDX] §2.2.2, §2.2.3.1, §2.3.1.1.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import struct
from collections.abc import Callable


def _load_crc32c() -> Callable[..., int]:
    """The ``crc32c`` function of the crc32c package's C extension, loaded without the package ``__init__``.

    That ``__init__`` asks importlib.metadata for its own version, which costs more start-up time than all of
    vhdx's own modules; the extension alone is what we call. Anything unexpected falls back to the package.
    """
    try:
        spec = importlib.util.find_spec("crc32c")  # locates the package without running it
        folders = list(spec.submodule_search_locations or ()) if spec else []
        for folder in folders:
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                path = os.path.join(folder, "_crc32c" + suffix)
                if os.path.isfile(path):
                    loader = importlib.machinery.ExtensionFileLoader("crc32c._crc32c", path)
                    ext_spec = importlib.util.spec_from_file_location("crc32c._crc32c", path, loader=loader)
                    if ext_spec is None:
                        continue
                    module = importlib.util.module_from_spec(ext_spec)
                    loader.exec_module(module)
                    return module.crc32c
    except (ImportError, OSError, AttributeError, ValueError):
        pass
    from crc32c import crc32c  # noqa: PLC0415 - fallback: the package as installed, whatever its layout

    return crc32c


crc32c = _load_crc32c()

_ZERO_FIELD = b"\x00\x00\x00\x00"


def crc32c_of(buf: bytes | bytearray | memoryview, crc_offset: int) -> int:
    """CRC-32C of ``buf`` computed as if the 4 bytes at ``crc_offset`` were zero (no copy of buf)."""
    view = memoryview(buf)
    crc = crc32c(view[:crc_offset])
    crc = crc32c(_ZERO_FIELD, crc)
    return crc32c(view[crc_offset + 4 :], crc)


def stored_crc(buf: bytes | bytearray | memoryview, crc_offset: int) -> int:
    """The checksum value stored in the structure (little-endian u32)."""
    return struct.unpack_from("<I", buf, crc_offset)[0]


def verify(buf: bytes | bytearray | memoryview, crc_offset: int) -> bool:
    """True when the stored checksum matches the computed one."""
    return stored_crc(buf, crc_offset) == crc32c_of(buf, crc_offset)


def stamp(buf: bytearray | memoryview, crc_offset: int) -> int:
    """Compute the checksum and store it in place; returns the value."""
    crc = crc32c_of(buf, crc_offset)
    struct.pack_into("<I", buf, crc_offset, crc)
    return crc
