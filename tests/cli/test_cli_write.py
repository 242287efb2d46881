"""CLI commands that create and change disks: exit codes, messages, and the bytes they leave."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import vhdx
from vhdx_cli.main import cli

MiB = 1 << 20


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in (result.output or "")
    return result


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_cli_create_write_read_back(tmp_path):
    disk = tmp_path / "d.vhdx"
    assert run("create", disk, "--size", "16M", "--block-size", "1M").exit_code == 0
    assert run("write", disk, "--offset", "1M", "--pattern", "0xa5", "--length", "3M").exit_code == 0
    with vhdx.open(disk) as image:
        assert image.read(MiB, 3 * MiB) == b"\xa5" * (3 * MiB)
        assert image.read(0, MiB) == bytes(MiB)


def test_cli_write_from_input_file_and_zero(tmp_path):
    disk, data = tmp_path / "d.vhdx", tmp_path / "in.bin"
    data.write_bytes(b"hello" * 1000)
    run("create", disk, "--size", "8M", "--block-size", "1M")
    assert run("write", disk, "--offset", "4096", "--input", data).exit_code == 0
    assert run("write", disk, "--offset", "4096", "--zero", "--length", "512").exit_code == 0
    with vhdx.open(disk) as image:
        assert image.read(4096, 5000) == bytes(512) + (b"hello" * 1000)[512:]


def test_cli_discard_unmaps_whole_blocks(tmp_path):
    disk = tmp_path / "d.vhdx"
    run("create", disk, "--size", "8M", "--block-size", "1M")
    run("write", disk, "--offset", "0", "--pattern", "1", "--length", "8M")
    assert run("discard", disk, "--offset", "2M", "--length", "2M").exit_code == 0
    with vhdx.open(disk) as image:
        assert image.bat.state_counts() == {"UNMAPPED": 2, "FULLY_PRESENT": 6}
        assert image.read(2 * MiB, 2 * MiB) == bytes(2 * MiB)


def test_cli_create_differencing_and_set_parent_after_a_move(tmp_path):
    base, child = tmp_path / "base.vhdx", tmp_path / "snap.avhdx"
    run("create", base, "--size", "8M")
    run("write", base, "--offset", "0", "--pattern", "7", "--length", "1M")
    assert run("create", child, "--parent", base).exit_code == 0
    moved = tmp_path / "elsewhere" / "base.vhdx"
    moved.parent.mkdir()
    base.rename(moved)
    assert run("map", child).exit_code == 0  # parent missing: mapped alone with a warning
    result = run("set-parent", child, moved)
    assert result.exit_code == 0, result.output
    assert "relative_path" in result.output
    with vhdx.open(child) as image:
        assert image.read(0, 16) == b"\x07" * 16


def test_cli_set_parent_refuses_a_mismatched_parent_unless_told(tmp_path):
    base, other, child = tmp_path / "base.vhdx", tmp_path / "other.vhdx", tmp_path / "snap.avhdx"
    run("create", base, "--size", "8M")
    run("create", other, "--size", "8M")
    run("create", child, "--parent", base)
    result = run("set-parent", child, other)
    assert result.exit_code == 1
    assert "DataWriteGuid" in one_error_line(result)
    assert run("set-parent", child, other, "--ignore-id-mismatch").exit_code == 0
    with vhdx.open(child) as image:
        assert image.parent.path == str(other)


@pytest.mark.parametrize("args, needle", [
    (["--size", "1000"], "multiple of the logical sector size"),
    (["--size", "16M", "--block-size", "3M"], "power of two"),
    (["--size", "100T"], "64 TiB"),
    (["--size", "ten"], "not a size"),
])
def test_cli_create_invalid_requests_fail_cleanly_and_create_nothing(tmp_path, args, needle):
    result = run("create", tmp_path / "x.vhdx", *args)
    assert result.exit_code != 0
    assert needle in result.output
    assert not (tmp_path / "x.vhdx").exists()


def test_cli_create_refuses_to_overwrite_without_force(tmp_path):
    disk = tmp_path / "d.vhdx"
    disk.write_bytes(b"keep me")
    result = run("create", disk, "--size", "8M")
    assert result.exit_code == 1 and "--force" in one_error_line(result)
    assert disk.read_bytes() == b"keep me"
    assert run("create", disk, "--size", "8M", "--force").exit_code == 0


def test_cli_write_outside_the_disk_is_a_one_line_error(tmp_path):
    disk = tmp_path / "d.vhdx"
    run("create", disk, "--size", "8M")
    result = run("write", disk, "--offset", "8M", "--pattern", "1", "--length", "1")
    assert result.exit_code == 1 and "outside the virtual disk" in one_error_line(result)


def test_cli_convert_raw_to_vhdx_and_back(tmp_path):
    raw = tmp_path / "in.raw"
    with open(raw, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(5 * MiB)
        f.write(b"data" * 10000)
    out = tmp_path / "out.vhdx"
    assert run("convert", raw, out, "-O", "vhdx", "--block-size", "1M").exit_code == 0
    with vhdx.open(out) as image:
        assert image.bat.state_counts() == {"NOT_PRESENT": 15, "FULLY_PRESENT": 1}
    back = tmp_path / "back.raw"
    assert run("convert", out, back).exit_code == 0
    assert back.read_bytes() == raw.read_bytes()


def test_cli_read_commands_warn_while_another_process_writes(tmp_path):
    import multiprocessing

    from tests.test_writer import _hold_lock

    disk = tmp_path / "d.vhdx"
    run("create", disk, "--size", "8M")
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(disk), ready, release))
    proc.start()
    try:
        assert ready.wait(10)
        result = CliRunner().invoke(cli, ["map", str(disk)])
        assert result.exit_code == 0
        assert "open for writing by another process" in result.output
    finally:
        release.set()
        proc.join(10)
