"""GUIDs as stored on disk: 16 bytes in Microsoft's mixed-endian order, exposed as ``uuid.UUID``.

References: [MS-VHDX] §2.1 (GUID), [MS-DTYP] §2.3.4.
"""

from __future__ import annotations

import uuid

from construct import Adapter, Bytes


class _GuidAdapter(Adapter):
    # Data1..Data3 are little-endian, Data4 is a byte string: exactly uuid's bytes_le.
    def _decode(self, obj, context, path):
        return uuid.UUID(bytes_le=bytes(obj))

    def _encode(self, obj, context, path):
        return obj.bytes_le


Guid = _GuidAdapter(Bytes(16))


def parse_guid_text(text: str) -> uuid.UUID | None:
    """Parse a GUID written as text in a parent locator (braces optional, any case); None if malformed."""
    cleaned = text.strip().strip("\x00").strip()
    if cleaned.startswith("{") and cleaned.endswith("}"):
        cleaned = cleaned[1:-1]
    try:
        return uuid.UUID(cleaned)
    except ValueError:
        return None


def format_guid_text(value: uuid.UUID) -> str:
    """GUID text as the spec asks writers to store it: lowercase with braces."""
    return "{" + str(value).lower() + "}"
