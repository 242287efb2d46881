"""Read a Windows Server 2012 / 2012 R2 VM configuration (UTF-16 XML) into the same key tree as a ``.vmcx``.

Each element with a ``type`` attribute is a value (``integer``, ``string``, ``bool``, ``bytes``); every other
element is a node. Documents with a DTD are refused: Hyper-V never writes one, and entities are an attack.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import xml.etree.ElementTree as ET  # the usual short name

from vhdx.errors import FormatError, UnsupportedError

MAX_XML_SIZE = 16 * 1024 * 1024  # real files are ~40 KiB
MAX_DEPTH = 64


def decode_text(raw: bytes, path: str) -> str:
    """The document's text: UTF-16 with a byte-order mark (what Hyper-V writes), or UTF-8."""
    for bom, codec in ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"),
                       (codecs.BOM_UTF8, "utf-8")):
        if raw.startswith(bom):
            raw, encoding = raw[len(bom) :], codec
            break
    else:
        encoding = "utf-16-le" if raw[1:2] == b"\0" else "utf-8"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise FormatError(f"not {encoding} text", structure="XML configuration", offset=exc.start,
                          path=path) from None


def parse_xml_config(raw: bytes, path: str) -> dict:
    """The key tree of an XML configuration (``{"configuration": {...}}``)."""
    if len(raw) > MAX_XML_SIZE:
        raise FormatError(f"{len(raw)} bytes is too large for a configuration", structure="XML configuration",
                          path=path)
    text = decode_text(raw, path)
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise UnsupportedError("document type declarations are not allowed", structure="XML configuration",
                               path=path)
    # The declaration names UTF-16, but the text is already decoded: drop it so the parser takes the str.
    if text.startswith("<?xml"):
        text = text[text.find("?>") + 2 :]
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise FormatError(f"not well-formed XML ({exc})", structure="XML configuration", path=path) from None
    return {root.tag: _node(root, path, 0)}


def _node(element, path: str, depth: int) -> dict:
    if depth > MAX_DEPTH:
        raise FormatError(f"elements nest deeper than {MAX_DEPTH} levels", structure="XML configuration", path=path)
    out = {}
    for child in element:
        out[child.tag] = _value(child, path) if "type" in child.attrib else _node(child, path, depth + 1)
    return out


def _value(element, path: str):
    kind, text = element.get("type"), element.text or ""
    where = f"XML element <{element.tag}>"
    try:
        if kind == "integer":
            return int(text.strip())
        if kind == "string":
            return text
        if kind == "bool":
            if text.strip() not in ("True", "False"):
                raise ValueError(text)
            return text.strip() == "True"
        if kind == "bytes":
            return base64.b64decode("".join(text.split()), validate=True)
    except (ValueError, binascii.Error):
        raise FormatError(f"{text[:40]!r} is not a valid {kind}", structure=where, path=path) from None
    raise UnsupportedError(f"unknown value type {kind!r}", structure=where, path=path)
