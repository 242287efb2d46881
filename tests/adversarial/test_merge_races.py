"""A merge racing other processes: writers that open a layer during the data phase, writers that bypass the
lock, and a second merge of the same chain. No write that got success may be missing afterwards."""

from __future__ import annotations

import subprocess
import sys
from contextlib import suppress
from pathlib import Path

import pytest

import vhdx
from tests.support.merge_chains import build_chain, read_view
from vhdx.errors import MergeError
from vhdx.io import ImageIO
from vhdx.ops.merge import find_interrupted
from vhdx.ops.merge import journal as merge_journal

MiB = 1 << 20
RACER_BYTES = b"\x5a" * (64 * 1024)
RACER_OFFSET = 3 * MiB


def vhdx_cli(*args) -> subprocess.CompletedProcess:
    """The installed command line in a separate process (a real second process, with its own descriptors)."""
    return subprocess.run([sys.executable, "-c", "from vhdx_cli.main import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def chain(tmp_path) -> tuple[list[Path], bytearray]:
    """snap2 -> snap1 -> base, with data in every layer (merged below: snap2 + snap1 into base)."""
    return build_chain(tmp_path, child_blocks=[1 * MiB, 2 * MiB], seed=31, ops=8)


def once(action):
    """A progress callback that runs ``action`` at the first progress report (the merge's data phase)."""
    box = {}

    def progress(_done, _total):
        if "result" not in box:
            box["result"] = action()

    return progress, box


@pytest.mark.parametrize("target", [0, 1, 2], ids=["child", "middle-layer", "destination"])
def test_a_writer_racing_a_merge_is_refused_while_the_merge_holds_the_file(tmp_path, target):
    paths, model = chain(tmp_path)
    progress, box = once(lambda: vhdx_cli("write", paths[target], "--offset", RACER_OFFSET, "--pattern", "0x5a",
                                          "--length", len(RACER_BYTES), "--force"))
    vhdx.merge_chain(paths[0], into=paths[2], progress=progress)
    racer = box["result"]
    assert racer.returncode == 1, racer.stdout
    assert "in use by another process" in racer.stderr or "open for writing" in racer.stderr
    assert read_view(paths[2]) == bytes(model)


def test_a_write_acknowledged_during_a_merge_is_never_lost(tmp_path):
    paths, model = chain(tmp_path)
    progress, box = once(lambda: vhdx_cli("write", paths[0], "--offset", RACER_OFFSET, "--pattern", "0x5a",
                                          "--length", len(RACER_BYTES)))
    with suppress(MergeError):
        vhdx.merge_chain(paths[0], into=paths[2], progress=progress)
    if box["result"].returncode == 0:  # the racer was told its write is durable: it must be readable
        survivor = paths[0] if paths[0].exists() else paths[2]
        with vhdx.open(survivor) as disk:
            assert disk.read(RACER_OFFSET, len(RACER_BYTES)) == RACER_BYTES


def lock_free_write(path: Path) -> None:
    """A writer that ignores the advisory lock (another tool), writing through the VHDX rules all the same."""
    with vhdx.open(ImageIO.open(path, writable=True, lock=False), orphan=True, force=True) as disk:
        disk.write(RACER_OFFSET, RACER_BYTES)


def test_a_merge_stops_before_deleting_a_layer_changed_behind_its_lock(tmp_path):
    paths, model = chain(tmp_path)
    progress, _ = once(lambda: lock_free_write(paths[0]))
    with pytest.raises(MergeError, match="changed while the merge ran") as err:
        vhdx.merge_chain(paths[0], into=paths[2], progress=progress)
    assert str(paths[0]) in str(err.value)
    assert paths[0].exists() and paths[1].exists()
    expected = bytearray(model)
    expected[RACER_OFFSET : RACER_OFFSET + len(RACER_BYTES)] = RACER_BYTES
    assert read_view(paths[0]) == bytes(expected)


def after_first_journal_write(monkeypatch, action) -> dict:
    """Run ``action`` right after the merge recorded its plan (planning done, nothing changed yet)."""
    box = {}
    original = merge_journal.write_journal

    def write_journal(journal):
        original(journal)
        if "result" not in box:
            box["result"] = action()

    monkeypatch.setattr(merge_journal, "write_journal", write_journal)
    return box


@pytest.mark.parametrize("second", [0, 1], ids=["same-child", "middle-layer"])
def test_a_second_merge_of_the_same_chain_is_refused_up_front(tmp_path, monkeypatch, second):
    paths, model = chain(tmp_path)
    box = after_first_journal_write(monkeypatch, lambda: vhdx_cli("merge", paths[second]))
    vhdx.merge_chain(paths[0], into=paths[2])
    second = box["result"]
    assert second.returncode == 1 and "in use by another process" in second.stderr, second.stderr
    assert read_view(paths[2]) == bytes(model) and find_interrupted(str(paths[0])) is None


def test_resuming_a_merge_that_is_still_running_is_refused(tmp_path):
    paths, model = chain(tmp_path)
    progress, box = once(lambda: vhdx_cli("merge", "--resume", paths[0]))
    vhdx.merge_chain(paths[0], into=paths[2], progress=progress)
    assert box["result"].returncode == 1 and "in use by another process" in box["result"].stderr
    assert read_view(paths[2]) == bytes(model)
