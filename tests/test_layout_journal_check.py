"""check reports a leftover ``.layout-journal`` (a resize or compaction that stopped before its end) the way it
reports an interrupted merge: a warning naming the operation and the ``--resume`` that finishes it."""

from __future__ import annotations

import os

from click.testing import CliRunner

from vhdx.findings import CODES, Severity
from vhdx.ops import layout_journal
from vhdx.ops.check import check_image
from vhdx.ops.create import create
from vhdx_cli.main import cli

MiB = 1 << 20


def disk(tmp_path) -> str:
    path = str(tmp_path / "d.vhdx")
    create(path, size=8 * MiB, block_size=MiB)
    return path


def test_check_reports_an_interrupted_compaction_and_how_to_finish_it(tmp_path):
    path = disk(tmp_path)
    layout_journal.write_journal(layout_journal.LayoutJournal("compact", path, mode="quick"))
    (found,) = check_image(path).find("LAYOUT_INTERRUPTED")
    assert found.severity == Severity.WARNING and "LAYOUT_INTERRUPTED" in CODES
    assert "compact" in found.message and "vhdx compact --resume" in found.message


def test_check_reports_an_interrupted_resize_and_how_to_finish_it(tmp_path):
    path = disk(tmp_path)
    layout_journal.write_journal(layout_journal.LayoutJournal("resize", path, size=16 * MiB))
    (found,) = check_image(path).find("LAYOUT_INTERRUPTED")
    assert "resize" in found.message and "vhdx resize --resume" in found.message


def test_check_reports_a_layout_journal_it_cannot_read(tmp_path):
    path = disk(tmp_path)
    with open(layout_journal.journal_path(path), "w") as f:
        f.write("{not json")
    (found,) = check_image(path).find("LAYOUT_INTERRUPTED")
    assert "cannot be read" in found.message


def test_check_without_a_layout_journal_reports_none(tmp_path):
    assert check_image(disk(tmp_path)).find("LAYOUT_INTERRUPTED") == []


def test_check_cli_shows_the_interrupted_compaction(tmp_path):
    path = disk(tmp_path)
    layout_journal.write_journal(layout_journal.LayoutJournal("compact", path, mode="full"))
    out = CliRunner().invoke(cli, ["check", path])
    assert "LAYOUT_INTERRUPTED" in out.output and "--resume" in out.output


def test_check_does_not_read_a_layout_journal_planted_as_a_device(tmp_path):
    path = disk(tmp_path)
    os.symlink("/dev/zero", layout_journal.journal_path(path))  # reading it would never end
    (found,) = check_image(path).find("LAYOUT_INTERRUPTED")
    assert "not a regular file" in found.message
