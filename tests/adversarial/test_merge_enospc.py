"""A full disk in the middle of a merge: the error names the file being written and says how to finish
(``vhdx merge --resume``); after space is freed the resumed merge gives the full result."""

from __future__ import annotations

import errno
import os

import pytest
from click.testing import CliRunner

import vhdx
from tests.adversarial.test_merge_races import chain
from tests.support.merge_chains import read_view
from vhdx.errors import MergeError
from vhdx_cli.main import cli


@pytest.fixture
def full_disk(monkeypatch):
    """``fill(path)``: writes to ``path`` past its present end fail with ENOSPC (as on a full file system)."""

    def fill(path):
        st = os.stat(path)
        limit = st.st_size

        def full(fd, offset, length) -> bool:
            target = os.fstat(fd)
            return (target.st_dev, target.st_ino) == (st.st_dev, st.st_ino) and offset + length > limit

        def no_space():
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        pwritev, pwrite, copy = os.pwritev, os.pwrite, os.copy_file_range

        def fake_pwritev(fd, buffers, offset, *a):
            if full(fd, offset, sum(len(memoryview(b).cast("B")) for b in buffers)):
                raise no_space()
            return pwritev(fd, buffers, offset, *a)

        def fake_pwrite(fd, data, offset):
            if full(fd, offset, len(memoryview(data).cast("B"))):
                raise no_space()
            return pwrite(fd, data, offset)

        def fake_copy(src, dst, count, offset_src=None, offset_dst=None):
            if full(dst, offset_dst or 0, count):
                raise no_space()
            return copy(src, dst, count, offset_src, offset_dst)

        monkeypatch.setattr(os, "pwritev", fake_pwritev)
        monkeypatch.setattr(os, "pwrite", fake_pwrite)
        monkeypatch.setattr(os, "copy_file_range", fake_copy)

    return fill


def test_enospc_during_a_merge_names_the_file_and_says_resume(tmp_path, full_disk, monkeypatch):
    paths, model = chain(tmp_path)
    full_disk(paths[2])
    with pytest.raises(MergeError) as err:
        vhdx.merge_chain(paths[0], into=paths[2])
    message = str(err.value)
    assert message.startswith(f"{paths[2]}:")
    assert (err.value.hint, err.value.hint_subject) == ("merge_resume", str(paths[0]))
    assert "No space left on device" in message
    monkeypatch.undo()  # space freed
    assert read_view(paths[0]) == bytes(model)
    vhdx.merge_chain(paths[0], resume=True)
    assert read_view(paths[2]) == bytes(model) and not paths[0].exists()


def test_cli_enospc_during_a_merge_is_one_line_with_the_resume_hint(tmp_path, full_disk):
    paths, _ = chain(tmp_path)
    full_disk(paths[2])
    result = CliRunner().invoke(cli, ["merge", str(paths[0]), "--into", str(paths[2])])
    assert result.exit_code == 1 and f"vhdx merge --resume {paths[0]}" in result.output
    assert str(paths[2]) in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_enospc_writing_the_merge_journal_leaves_no_temporary_and_says_resume(tmp_path, monkeypatch):
    paths, model = chain(tmp_path)

    def no_room(_fd, _data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", no_room)
    with pytest.raises(MergeError) as err:
        vhdx.merge_chain(paths[0], into=paths[2])
    assert (err.value.hint, err.value.hint_subject) == ("merge_resume", str(paths[0]))
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.tmp")) and read_view(paths[0]) == bytes(model)
    vhdx.merge_chain(paths[0], into=paths[2], resume=True)  # nothing had begun: --resume simply merges
    assert read_view(paths[2]) == bytes(model)
