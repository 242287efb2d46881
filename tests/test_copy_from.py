"""``ImageIO.copy_from``: whole 1 MiB-aligned ranges are shared (FICLONERANGE) where the file system can, every
other range and every refusal is copied; and a merge on XFS with reflink shares the child's whole blocks."""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import closing

import pytest

import vhdx
from tests.support.merge_chains import make_merge_workload, read_view
from tests.support.reflink import mount_xfs, shared_bytes, unmount
from vhdx import io as vio
from vhdx.io import CLONE_ALIGN, ImageIO

MiB = 1 << 20


def files(folder, size=4 * MiB):
    src, dst = folder / "src.bin", folder / "dst.bin"
    payload = os.urandom(size)
    src.write_bytes(payload)
    dst.write_bytes(bytes(size))
    return src, dst, payload


@pytest.fixture(scope="session")
def xfs(tmp_path_factory):
    mnt = mount_xfs(tmp_path_factory.mktemp("reflink"))
    yield mnt
    unmount(mnt)


class Ioctl:
    """Stands in for fcntl.ioctl: refuses every clone with ``code`` and counts the calls."""

    def __init__(self, code: int) -> None:
        self.code, self.calls = code, 0

    def __call__(self, *_args):
        self.calls += 1
        raise OSError(self.code, os.strerror(self.code))


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL])
def test_copy_from_copies_when_the_file_system_refuses_to_share(tmp_path, monkeypatch, code):
    src, dst, payload = files(tmp_path)
    ioctl = Ioctl(code)
    monkeypatch.setattr(vio.fcntl, "ioctl", ioctl)
    with closing(ImageIO.open(src)) as s, closing(ImageIO.open(dst, writable=True)) as d:
        assert d.copy_from(s, 0, 0, 2 * MiB) == 0
        assert d.copy_from(s, 2 * MiB, 2 * MiB, 2 * MiB) == 0
    assert dst.read_bytes() == payload
    assert ioctl.calls == 1  # asked once per handle, then copied straight away


def test_copy_from_tries_to_share_only_whole_aligned_ranges(tmp_path, monkeypatch):
    src, dst, payload = files(tmp_path)
    ioctl = Ioctl(errno.EOPNOTSUPP)
    monkeypatch.setattr(vio.fcntl, "ioctl", ioctl)
    with closing(ImageIO.open(src)) as s, closing(ImageIO.open(dst, writable=True)) as d:
        d.copy_from(s, 4096, 4096, 2 * MiB)  # 4 KiB-aligned only
        d.copy_from(s, 0, 0, MiB // 2)  # shorter than a megabyte
        d.copy_from(s, 3 * MiB, 3 * MiB, MiB - 512)  # unaligned length
    assert ioctl.calls == 0
    got = dst.read_bytes()
    assert got[: 4096 + 2 * MiB] == payload[: 4096 + 2 * MiB]
    assert got[3 * MiB : 4 * MiB - 512] == payload[3 * MiB : 4 * MiB - 512]


def test_copy_from_copies_what_the_source_overlay_replaces(tmp_path, monkeypatch):
    src, dst, _ = files(tmp_path)
    ioctl = Ioctl(errno.EOPNOTSUPP)
    monkeypatch.setattr(vio.fcntl, "ioctl", ioctl)
    with closing(ImageIO.open(src)) as s, closing(ImageIO.open(dst, writable=True)) as d:
        s.overlay = vio.Overlay()
        s.overlay.set_sector(MiB, b"\xab" * 4096)
        d.copy_from(s, 0, 0, 2 * MiB)
    assert ioctl.calls == 0
    assert dst.read_bytes()[MiB : MiB + 4096] == b"\xab" * 4096


def test_copy_from_on_this_file_system_gives_the_bytes(tmp_path):
    src, dst, payload = files(tmp_path)
    with closing(ImageIO.open(src)) as s, closing(ImageIO.open(dst, writable=True)) as d:
        d.copy_from(s, MiB, 0, 3 * MiB)
    assert dst.read_bytes()[: 3 * MiB] == payload[MiB:]


def test_copy_from_shares_extents_on_xfs_with_reflink(xfs):
    folder = xfs / "copy"
    folder.mkdir()
    src, dst, payload = files(folder, 8 * MiB)
    os.sync()
    with closing(ImageIO.open(src)) as s, closing(ImageIO.open(dst, writable=True)) as d:
        assert d.copy_from(s, 0, 0, 8 * MiB) == 8 * MiB
    assert dst.read_bytes() == payload
    assert shared_bytes(dst) == 8 * MiB
    shutil.rmtree(folder)


def test_merge_on_xfs_shares_the_childs_whole_blocks_with_the_destination(xfs):
    folder = xfs / "merge"
    child = make_merge_workload(folder, 64 * MiB, block_size=2 * MiB, base_block=2 * MiB)
    expected = read_view(child)
    os.sync()
    vhdx.merge_chain(child, keep=True)
    assert read_view(folder / "base.vhdx") == expected
    # The merged child is kept (renamed), so the blocks it shares with the destination show as shared.
    assert shared_bytes(folder / "base.vhdx") >= 64 * MiB
    assert MiB == CLONE_ALIGN
    shutil.rmtree(folder)
