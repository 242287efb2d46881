"""Interrupted merges never deadlock: ``--abort`` rolls back a merge that has not reached its point of no
return (the destination's first change) or gives it up saying exactly what stays; ``--resume`` with nothing
begun simply merges; a merge that is still running cannot be aborted."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

import vhdx
from tests.adversarial.test_merge_races import RACER_BYTES, RACER_OFFSET, chain, lock_free_write, once, vhdx_cli
from tests.support.faulty_io import SimulatedCrash
from tests.support.merge_chains import read_view
from vhdx.errors import MergeError
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.ops.merge import find_interrupted
from vhdx.ops.merge import journal as merge_journal
from vhdx_cli.main import cli


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def locator(path) -> dict:
    with vhdx.open(path, orphan=True) as disk:
        return dict(disk.params.parent_locator.entries)


def crash_on_first_write_of(target):
    """An opener whose handle on ``target`` dies at its first write (as the process would)."""

    class Dying(ImageIO):
        def write_at(self, offset, data):
            raise SimulatedCrash(f"killed before writing {self.path}")

    return lambda path: (Dying if str(path) == str(target) else ImageIO).open(path, writable=True)


def test_abort_before_the_destination_changed_rolls_everything_back(tmp_path):
    paths, model = chain(tmp_path)
    dest_before, locator_before = digest(paths[2]), locator(paths[1])
    with pytest.raises(SimulatedCrash):
        vhdx.merge_chain(paths[0], into=paths[2], opener=crash_on_first_write_of(paths[2]))
    assert locator(paths[1]).get(c.PARENT_LINKAGE2_KEY) != locator_before.get(c.PARENT_LINKAGE2_KEY)
    done = vhdx.abort_merge(paths[0])
    assert done.rolled_back and not done.remains
    assert locator(paths[1]) == locator_before and digest(paths[2]) == dest_before
    assert find_interrupted(str(paths[0])) is None and not list(tmp_path.glob("*.merge-*"))
    assert read_view(paths[0]) == bytes(model)


def test_abort_after_the_destination_changed_says_what_stays_and_the_chain_reads_as_before(tmp_path):
    paths, model = chain(tmp_path)

    def die(_done, _total):
        raise SimulatedCrash("killed while copying")

    with pytest.raises(SimulatedCrash):
        vhdx.merge_chain(paths[0], into=paths[2], progress=die)
    done = vhdx.abort_merge(paths[0])
    assert not done.rolled_back and done.state == "planned"
    assert any("part of the merged data" in s for s in done.remains)
    assert find_interrupted(str(paths[0])) is None and read_view(paths[0]) == bytes(model)
    vhdx.merge_chain(paths[0], into=paths[2])  # and a fresh merge works at once
    assert read_view(paths[2]) == bytes(model)


def test_abort_after_the_data_phase_keeps_every_file_readable(tmp_path, monkeypatch):
    paths, model = chain(tmp_path)

    def die(_path, **_kw):
        raise SimulatedCrash("killed while deleting")

    monkeypatch.setattr(merge_journal, "remove_file", die)
    with pytest.raises(SimulatedCrash):
        vhdx.merge_chain(paths[0], into=paths[2])
    monkeypatch.undo()
    done = vhdx.abort_merge(paths[0])
    # No child of the merged child to relink: the journal goes from data_done straight to the deletions.
    assert done.state == "data_done" and any("holds the whole merge" in s for s in done.remains)
    assert read_view(paths[0]) == bytes(model) and read_view(paths[2]) == bytes(model)


def test_a_merge_stopped_by_a_changed_layer_can_be_given_up_and_merged_again(tmp_path):
    paths, model = chain(tmp_path)
    progress, _ = once(lambda: lock_free_write(paths[0]))
    with pytest.raises(MergeError):
        vhdx.merge_chain(paths[0], into=paths[2], progress=progress)
    with pytest.raises(MergeError, match="no longer the one the merge was planned for"):
        vhdx.merge_chain(paths[0], resume=True)
    vhdx.abort_merge(paths[0])
    vhdx.merge_chain(paths[0], into=paths[2])
    expected = bytearray(model)
    expected[RACER_OFFSET : RACER_OFFSET + len(RACER_BYTES)] = RACER_BYTES
    assert read_view(paths[2]) == bytes(expected)


def test_abort_of_a_merge_that_is_still_running_is_refused(tmp_path):
    paths, model = chain(tmp_path)
    progress, box = once(lambda: vhdx_cli("merge", "--abort", paths[0]))
    vhdx.merge_chain(paths[0], into=paths[2], progress=progress)
    assert box["result"].returncode == 1 and "in use by another process" in box["result"].stderr
    assert read_view(paths[2]) == bytes(model)


def test_abort_without_an_interrupted_merge_is_a_one_line_error(tmp_path):
    paths, _ = chain(tmp_path)
    result = CliRunner().invoke(cli, ["merge", "--abort", str(paths[0])])
    assert result.exit_code == 1 and "nothing to abort" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_abort_reports_the_rollback(tmp_path):
    paths, model = chain(tmp_path)
    with pytest.raises(SimulatedCrash):
        vhdx.merge_chain(paths[0], into=paths[2], opener=crash_on_first_write_of(paths[2]))
    result = CliRunner().invoke(cli, ["merge", "--abort", str(paths[0]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rolled_back"] is True and read_view(paths[0]) == bytes(model)


def test_cli_resume_when_nothing_was_begun_merges(tmp_path):
    paths, model = chain(tmp_path)
    result = CliRunner().invoke(cli, ["merge", "--resume", str(paths[0]), "--into", str(paths[2])])
    assert result.exit_code == 0, result.output
    assert not paths[0].exists() and read_view(paths[2]) == bytes(model)
