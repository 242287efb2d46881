from __future__ import annotations

import hashlib
import struct

import pytest

from tests.support.hyperv_oracle import STORAGE_SAMPLES, XML_SAMPLES, dissect_tree, minidom_tree, sample
from vhdx.errors import ChecksumError, FormatError, UnsupportedError
from vhdx.hyperv.config import layouts as L
from vhdx.hyperv.config import read_config
from vhdx.hyperv.config.storage import read_storage
from vhdx.hyperv.config.writer import stamp, with_pending_log


def copy_of(tmp_path, name: str) -> bytearray:
    return bytearray(sample(name).read_bytes())


def save(tmp_path, data: bytes, name: str = "x.vmcx") -> str:
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return str(path)


@pytest.mark.peer
@pytest.mark.parametrize("name", STORAGE_SAMPLES)
def test_storage_sample_reads_to_the_same_tree_as_dissect(name):
    path = sample(name)
    assert read_config(str(path)).root == dissect_tree(path)


@pytest.mark.parametrize("name", XML_SAMPLES)
def test_xml_sample_reads_to_the_same_tree_as_minidom(name):
    path = sample(name)
    config = read_config(str(path))
    assert config.format == "xml"
    assert config.root == minidom_tree(path)


def test_storage_reader_uses_the_header_with_the_higher_sequence():
    storage = read_storage(str(sample("test.vmcx")))
    assert (storage.header_index, storage.sequence_number) == (0, 25)


def test_storage_reader_falls_back_to_the_other_header_when_one_checksum_is_bad(tmp_path):
    data = copy_of(tmp_path, "test.vmcx")
    data[L.HEADER_OFFSETS[0] + 8] ^= 0xFF  # sequence number byte: the CRC no longer matches
    storage = read_storage(save(tmp_path, data))
    assert (storage.header_index, storage.sequence_number) == (1, 24)
    assert storage.root == dissect_tree(sample("test.vmcx"))


def test_storage_reader_refuses_a_file_whose_headers_are_both_bad(tmp_path):
    data = copy_of(tmp_path, "test.vmcx")
    data[L.HEADER_OFFSETS[0] + 8] ^= 0xFF
    data[L.HEADER_OFFSETS[1] + 8] ^= 0xFF
    with pytest.raises(ChecksumError, match="no valid storage header"):
        read_storage(save(tmp_path, data))


def test_storage_reader_refuses_an_unknown_format_version(tmp_path):
    data = copy_of(tmp_path, "test.vmcx")
    for off in L.HEADER_OFFSETS:
        head = bytearray(data[off : off + L.StorageHeader.sizeof()])
        head[10:14] = struct.pack("<I", 0x300)
        stamp(head, L.HEADER_CHECKSUM_OFFSET)
        data[off : off + len(head)] = head
    with pytest.raises(UnsupportedError, match="version 0x300"):
        read_storage(save(tmp_path, data))


def first_key_entry_type_offset() -> int:
    return 0x3000 + L.KeyTableHeader.sizeof()


def test_storage_reader_refuses_an_unknown_value_type(tmp_path):
    data = copy_of(tmp_path, "test.vmcx")
    data[first_key_entry_type_offset()] = 0x0C
    with pytest.raises(UnsupportedError, match="unknown value type 12"):
        read_storage(save(tmp_path, data))


def test_storage_reader_refuses_a_key_entry_with_a_bad_checksum(tmp_path):
    data = copy_of(tmp_path, "test.vmcx")
    data[first_key_entry_type_offset() + L.KeyEntryHeader.sizeof() + 1] ^= 0x20  # a letter of "configuration"
    with pytest.raises(ChecksumError, match="Key table 1 entry at offset 0x300a"):
        read_storage(save(tmp_path, data))


def dirty_copy(tmp_path) -> tuple[bytearray, bytes]:
    """test.vmcx whose key table 1 is scribbled over, with the good page waiting in the replay log."""
    clean = bytes(copy_of(tmp_path, "test.vmcx"))
    good_page = clean[0x3000:0x4000]
    dirty = bytearray(with_pending_log(clean, [(0x3000, good_page)]))
    dirty[0x3000:0x4000] = bytes(0x1000)
    return dirty, good_page


def test_dirty_log_is_replayed_in_memory_to_the_clean_tree(tmp_path):
    dirty, _ = dirty_copy(tmp_path)
    path = save(tmp_path, dirty)
    before = hashlib.sha256(dirty).hexdigest()
    storage = read_storage(path)
    assert storage.replayed_entries == 1
    assert storage.root == dissect_tree(sample("test.vmcx"))
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == before  # never written


def test_dirty_log_with_torn_data_is_refused_and_nothing_is_replayed(tmp_path):
    dirty, _ = dirty_copy(tmp_path)
    log_offset = 0xA000
    dirty[log_offset + 0x1000 + 5] ^= 0xFF
    with pytest.raises(ChecksumError, match="data checksum mismatch"):
        read_storage(save(tmp_path, dirty))


def test_storage_reader_refuses_a_truncated_file(tmp_path):
    data = copy_of(tmp_path, "test.vmcx")
    with pytest.raises(FormatError, match="truncated"):
        read_storage(save(tmp_path, data[:0x3800]))


def test_xml_with_a_doctype_is_refused(tmp_path):
    doc = '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><configuration><n type="string">&a;</n></configuration>'
    with pytest.raises(UnsupportedError, match="document type"):
        read_config(save(tmp_path, doc.encode(), "x.xml"))


def test_xml_with_a_bad_integer_names_the_element(tmp_path):
    doc = '<configuration><properties><version type="integer">abc</version></properties></configuration>'
    with pytest.raises(FormatError, match="<version>"):
        read_config(save(tmp_path, doc.encode("utf-16"), "x.xml"))


def test_a_file_that_is_neither_format_is_refused(tmp_path):
    with pytest.raises(FormatError):
        read_config(save(tmp_path, b"\x00" * 64 + b"garbage", "x.vmcx"))
