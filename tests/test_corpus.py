"""Real images made by Windows, Hyper-V, Disk2VHD and QEMU read to the sha256 their MANIFEST records."""

from __future__ import annotations

import hashlib

import pytest

import vhdx
from vhdx.errors import ParentNotFoundError

# (corpus file, expected sha256 of the whole virtual disk) from tests/corpus/MANIFEST.md.
EXPECTED = {
    "dfvfs/fat-parent.vhdx.gz": "2d1954fec68faefe81dd3687282a9b387bf8417f6d2cf0da3825fa1445b64cfb",
    "dfvfs/ntfs-fixed.vhdx.gz": "5237dd895f38052344e2ef35a207fe9df08cd18d17b6ea857a1b93cc475e1f2e",
    "dfvfs/ntfs-dynamic.vhdx.gz": "b92731f8e4bf3532418444d22a9086823a8122569500acd09cd8d2ce20eb98e9",
    "dfvfs/ext2.vhdx.gz": "a6c2f0e39afe6c6ab432ca5465349fcefe8dc944398e97b2d957d3f89dbb5d80",
    "dissect.hypervisor/fixed.vhdx.gz": "bc0be4623b15aa84216fb31ba24e3b621ec7f1c72d198c990ac0eced222d9f62",
    "dissect.hypervisor/dynamic.vhdx.gz": "8e2b5e9265d694b42b81819e3bff29770eff4ed0f4f9f311693ff3dbdc93efac",
    "qemu-iotests/test-disk2vhd.vhdx.bz2": "96d964042be9b58dda1725567abfb0cf9fd8380e2118754afa979c2ad445938a",
    # After replaying the log (the hash of the un-replayed content is cc3d67a6...: a reader that ignores logs).
    "qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2": "179cefe8b0587f123393eedf2aa7aa8d25798591178e6bc3950a09762f38f96f",
    "discutils/btrfs.vhdx.gz": "0b959f9cb4e18348ad8b646f152178282542c8304f02fddf765e3fd1a1de6864",
    "discutils/swap.vhdx.gz": "60dd30b4c74361427d1089510cabb36e2eeda0cc4747f467ea43173acd358c49",
    "discutils/xfs5.vhdx.gz": "edc5d630b2da0ddb08992afb58ded06ffb56b884e184b4974fda16e31b7e6817",
    "discutils/xfs.vhdx.gz": "8ca2bd2d91f1c6ada47128fc2f8d38587e73954ede5a664fe2bb09c19606060e",
    "coreos-hyperv/config2_base.vhdx.bz2": "afce9cca367ebfa91a673d612bcb6fc32b12a80211207f7a7b1cd3aed3cac19d",
}
CHILD_OVER_PARENT = "a538161f34bc44c12bf9a542ce9218741c62728723ea18d0e4f6ea92e9f32e93"


def sha256_of_disk(image) -> str:
    digest = hashlib.sha256()
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    offset = 0
    while True:
        n = image.readinto(offset, buf)
        if n == 0:
            return digest.hexdigest()
        digest.update(view[:n])
        offset += n


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_image_reads_to_manifest_sha256(corpus_image, name):
    with vhdx.open(corpus_image(name)) as image:
        assert sha256_of_disk(image) == EXPECTED[name]


def test_corpus_windows_child_resolves_relative_parent_path(corpus_image):
    corpus_image("dfvfs/fat-parent.vhdx.gz")
    with vhdx.open(corpus_image("dfvfs/fat-differential.vhdx.gz")) as child:
        assert child.params.parent_locator.get("relative_path") == ".\\fat-parent.vhdx"
        assert sha256_of_disk(child) == CHILD_OVER_PARENT
        assert child.parent_source == "relative_path"
        assert child.parent.data_write_guid in child.params.parent_locator.linkages


def test_corpus_dirty_log_is_replayed_in_memory_without_writing(corpus_image):
    path = corpus_image("qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2")
    before = path.read_bytes()
    with vhdx.open(path) as image:
        assert image.log.needs_replay
        assert image.read(0, 18 << 20) == b"\xa5" * (18 << 20)
    assert path.read_bytes() == before


def test_corpus_hyperv_avhdx_without_parent_opens_and_names_paths_tried(corpus_image):
    path = corpus_image("dissect.hypervisor/differencing.avhdx.gz")
    with vhdx.open(path) as image:
        assert image.disk_type == vhdx.DiskType.DIFFERENCING
        assert image.bat.state_counts()["PARTIALLY_PRESENT"] == 32
        with pytest.raises(ParentNotFoundError) as err:
            image.read(0, 4096)
    assert "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx" in str(err.value)
    assert err.value.tried


def test_corpus_disk2vhd_equal_sequence_headers_are_accepted(corpus_image):
    with vhdx.open(corpus_image("qemu-iotests/test-disk2vhd.vhdx.bz2")) as image:
        seqs = [copy.header.sequence_number for copy in image.headers.copies]
        assert seqs[0] == seqs[1]
        assert image.headers.current_index == 0
