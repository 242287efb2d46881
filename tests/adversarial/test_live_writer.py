"""Item 14 of issue 12: with another process writing, every read command warns (once), says when it replays a
log in memory, and check does not call the writer's own log corruption."""

from __future__ import annotations

import multiprocessing

import pytest
from click.testing import CliRunner

import vhdx
from vhdx.ops.check import check_image
from vhdx_cli.main import cli

MiB = 1 << 20
IN_USE = "is open for writing by another process"
REPLAYED = "replayed in memory"


def _write_and_hold(path, ready, release):
    """A writer at work: one commit done (its log entry is live in the header), the file still open."""
    image = vhdx.open(path, writable=True)
    image.write(MiB, b"\x42" * 8192)
    image.flush()
    ready.set()
    release.wait(30)
    image.close()


@pytest.fixture
def live_writer(tmp_path):
    path = tmp_path / "d.vhdx"
    vhdx.create_image(path, 4 * MiB, block_size=MiB)
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_write_and_hold, args=(str(path), ready, release))
    proc.start()
    assert ready.wait(10)
    yield path, proc
    if proc.exitcode is None:  # not killed: (setting the event after a kill -9 would wait for the dead waiter)
        release.set()
        proc.join(10)


READ_COMMANDS = {
    "info": ["info", "{disk}"],
    "chain": ["chain", "{disk}"],
    "map": ["map", "{disk}"],
    "hash": ["hash", "{disk}"],
    "slack": ["slack", "{disk}"],
    "diff": ["diff", "{disk}"],
    "flatten": ["flatten", "{disk}", "{out}"],
    "convert": ["convert", "{disk}", "{out}", "-O", "raw"],
    "check": ["check", "{disk}"],
}


@pytest.mark.parametrize("name", sorted(READ_COMMANDS))
def test_read_command_warns_once_that_another_process_writes_and_that_it_replays_the_log(live_writer, tmp_path,
                                                                                         name):
    disk, _proc = live_writer
    args = [a.format(disk=disk, out=tmp_path / "out.img") for a in READ_COMMANDS[name]]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.count(IN_USE) == 1, result.output
    assert result.output.count(REPLAYED) >= 1, result.output
    assert "Traceback" not in result.output


def test_check_does_not_report_a_live_writers_log_as_corruption(live_writer):
    disk, _proc = live_writer
    report = check_image(disk)
    assert report.exit_code == 0
    assert "LOG_DIRTY" not in report.codes()
    assert {"IN_USE", "LOG_IN_USE"} <= set(report.codes())
    assert "transient" in report.find("IN_USE")[0].message


def test_check_reports_the_log_of_a_killed_writer_as_dirty(live_writer):
    disk, proc = live_writer
    proc.kill()  # kill -9: the log entry stays, nobody holds the file any more
    proc.join(10)
    report = check_image(disk)
    assert report.exit_code == 2
    assert "LOG_DIRTY" in report.codes() and "IN_USE" not in report.codes()
