"""Independent readers of Hyper-V configurations, for tests only: dissect.hypervisor for the binary storage
format (AGPL, never imported by the package), and a minidom walk for the XML configurations."""

from __future__ import annotations

import base64
from pathlib import Path
from xml.dom import minidom

import pytest

from tests.support.corpus import CORPUS, corpus_file

HYPERV_CONFIG = CORPUS / "hyperv-config"
STORAGE_SAMPLES = ("test.vmcx", "EC04F346-DB96-4700-AF5B-77B3C56C38BD.vmcx", "data.vmcx", "test.VMRS")
XML_SAMPLES = ("B90AC31B-C6F8-479F-9B91-07B894A6A3F6.xml", "D351C151-DAC7-4042-B434-B72D522C1E4A.xml")


def sample(name: str) -> Path:
    return corpus_file(f"hyperv-config/{name}")


def dissect_tree(path) -> dict:
    hyperv = pytest.importorskip("dissect.hypervisor.descriptor.hyperv")
    with open(path, "rb") as f:
        return hyperv.HyperVFile(f).as_dict()


def minidom_tree(path) -> dict:
    """The key tree of an XML configuration, read with minidom (a different parser API from the package's)."""
    doc = minidom.parseString(Path(path).read_bytes())

    def node(element) -> dict:
        out = {}
        for child in element.childNodes:
            if child.nodeType != child.ELEMENT_NODE:
                continue
            kind = child.getAttribute("type")
            if not kind:
                out[child.tagName] = node(child)
                continue
            text = "".join(t.data for t in child.childNodes if t.nodeType == t.TEXT_NODE)
            out[child.tagName] = {"integer": int, "string": str, "bool": lambda s: s == "True",
                                  "bytes": lambda s: base64.b64decode("".join(s.split()))}[kind](text)
        return out

    return {doc.documentElement.tagName: node(doc.documentElement)}
