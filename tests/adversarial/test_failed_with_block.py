"""Item 6 of issue 12: a writable ``with`` block that raises commits nothing it staged; rejected metadata is
never written."""

from __future__ import annotations

import pytest

import vhdx
from vhdx.format import constants as c
from vhdx.ops.check import check_image
from vhdx.structures.metadata import MetadataItem, build_parent_locator, read_items

MiB = 1 << 20


class Boom(Exception):
    pass


def test_a_with_block_that_raises_commits_nothing_it_staged(tmp_path):
    path = tmp_path / "d.vhdx"
    vhdx.create_image(path, 8 * MiB, block_size=MiB)
    size = path.stat().st_size
    with pytest.raises(Boom), vhdx.open(path, writable=True) as image:
        image.write(0, b"\x11" * 4096)
        raise Boom
    with vhdx.open(path) as image:
        assert image.read(0, 4096) == bytes(4096)
        assert not image.log.needs_replay
    assert path.stat().st_size == size
    assert check_image(path).exit_code == 0


def test_a_with_block_that_raises_keeps_what_was_flushed_before(tmp_path):
    path = tmp_path / "d.vhdx"
    vhdx.create_image(path, 8 * MiB, block_size=MiB)
    with pytest.raises(Boom), vhdx.open(path, writable=True) as image:
        image.write(0, b"\x11" * 4096)
        image.flush()
        image.write(3 * MiB, b"\x22" * 4096)
        raise Boom
    with vhdx.open(path) as image:
        assert image.read(0, 4096) == b"\x11" * 4096
        assert image.read(3 * MiB, 4096) == bytes(4096)
    assert check_image(path).exit_code == 0


def test_rewrite_metadata_never_commits_a_locator_it_rejected(tmp_path):
    base, child = tmp_path / "base.vhdx", tmp_path / "child.avhdx"
    vhdx.create_image(base, 8 * MiB)
    vhdx.create_image(child, parent=base)
    with vhdx.open(child, orphan=True) as image:
        entries = list(image.params.parent_locator.entries)
        region = image.regions.metadata
        before = image.io.read_at(region.file_offset, region.length)
    duplicated = build_parent_locator([entries[0], *entries])  # a key twice: the reader refuses it
    with vhdx.open(child, writable=True, orphan=True) as image:
        items = [MetadataItem(i.item_id, i.flags, duplicated) if i.item_id == c.PARENT_LOCATOR_GUID else i
                 for i in read_items(image.io, image.metadata)]
        image.writer.begin(changes_data=False)
        with pytest.raises(vhdx.VhdxError, match="duplicate key"):
            image.writer.rewrite_metadata(items)
        assert image.params.parent_locator.entries == tuple(entries)
    with vhdx.open(child, orphan=True) as image:
        assert image.io.read_at(region.file_offset, region.length) == before
    assert check_image(child).exit_code == 0
