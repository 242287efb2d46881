"""Parent locators as Hyper-V writes them: absolute_win32_path is a Windows path or absent, never a POSIX path."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

import vhdx
from vhdx.ops.create import windows_absolute_path
from vhdx_cli.main import cli

MiB = 1 << 20


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize(("path", "windows", "wsl", "expected"), [
    ("C:\\VMs\\base.vhdx", True, False, "C:\\VMs\\base.vhdx"),
    ("\\\\server\\share\\VMs\\base.vhdx", True, False, "\\\\server\\share\\VMs\\base.vhdx"),
    ("/mnt/d/VMs/base.vhdx", False, True, "D:\\VMs\\base.vhdx"),
    ("/mnt/d/VMs/base.vhdx", False, False, None),  # /mnt/d means a drive only under WSL
    ("/srv/vms/base.vhdx", False, True, None),
    ("/srv/vms/base.vhdx", False, False, None),
])
def test_windows_absolute_path_is_a_drive_or_unc_path_or_nothing(path, windows, wsl, expected):
    assert windows_absolute_path(path, windows=windows, wsl=wsl) == expected


def test_create_parent_on_posix_stores_no_posix_absolute_path(tmp_path):
    base, child = tmp_path / "base.vhdx", tmp_path / "child.avhdx"
    vhdx.create_image(base, 4 * MiB, block_size=MiB)
    assert run("create", child, "--parent", base).exit_code == 0
    with vhdx.open(child) as image:
        entries = dict(image.params.parent_locator.entries)
    assert entries["relative_path"] == ".\\base.vhdx"
    assert "absolute_win32_path" not in entries
    assert not any(value.startswith("/") for value in entries.values())


@pytest.fixture()
def windows_pair(corpus_image, tmp_path):
    for name in ("fat-parent.vhdx", "fat-differential.vhdx"):
        shutil.copyfile(corpus_image(f"dfvfs/{name}.gz"), tmp_path / name)
    return tmp_path / "fat-differential.vhdx", tmp_path / "fat-parent.vhdx"


def test_set_parent_dry_run_lists_every_key_that_changes_or_disappears(windows_pair):
    child, parent = windows_pair
    result = run("set-parent", "--dry-run", child, parent)
    assert result.exit_code == 0, result.output
    for key in ("volume_path", "parent_linkage2", "absolute_win32_path"):
        assert f"{key}: " in result.output and "(removed)" in result.output, key
    assert "relative_path: .\\fat-parent.vhdx (unchanged)" in result.output


def test_set_parent_ignoring_id_mismatch_still_warns_about_size_and_disk_id(tmp_path):
    base, other, child = tmp_path / "base.vhdx", tmp_path / "other.vhdx", tmp_path / "child.avhdx"
    vhdx.create_image(base, 8 * MiB, block_size=MiB)
    vhdx.create_image(other, 4 * MiB, block_size=MiB)
    vhdx.create_image(child, parent=base)
    result = run("set-parent", "--ignore-id-mismatch", child, other)
    assert result.exit_code == 0, result.output
    assert "virtual size" in result.stderr and "disk id" in result.stderr


def test_set_parent_to_the_same_parent_has_no_warning(tmp_path):
    base, child = tmp_path / "base.vhdx", tmp_path / "child.avhdx"
    vhdx.create_image(base, 8 * MiB, block_size=MiB)
    vhdx.create_image(child, parent=base)
    result = run("set-parent", child, base)
    assert result.exit_code == 0 and "warning" not in result.stderr
