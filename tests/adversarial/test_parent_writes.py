"""Writing a disk that differencing disks depend on would change its DataWriteGuid and break them: refused
(like Hyper-V) unless forced, naming the children, whether they sit in the same folder or a search folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

import vhdx
from vhdx.errors import DependentsError, MergeError
from vhdx.ops.create import create
from vhdx_cli.main import cli

MiB = 1 << 20


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def family(tmp_path):
    """base.vhdx with data, and child.avhdx on it in the same folder."""
    base = create(tmp_path / "base.vhdx", 8 * MiB)
    with vhdx.open(base, writable=True) as disk:
        disk.write(0, b"\x11" * MiB)
    child = create(tmp_path / "child.avhdx", parent=base)
    return Path(base), Path(child)


def test_writing_a_disk_with_a_child_is_refused_naming_the_child(family):
    base, child = family
    with vhdx.open(base, writable=True) as disk, pytest.raises(DependentsError, match="child.avhdx") as err:
        disk.write(0, b"\x22" * 4096)
    assert err.value.dependents == [str(child)]


def test_a_refused_write_leaves_every_byte_of_the_parent_as_it_was(family):
    base, child = family
    before = digest(base)
    with vhdx.open(base, writable=True) as disk, pytest.raises(DependentsError):
        disk.write(0, b"\x22" * 4096)
    assert digest(base) == before
    with vhdx.open(child) as disk:
        assert disk.read(0, 4096) == b"\x11" * 4096


@pytest.mark.parametrize("operation", ["write_zeros", "discard"])
def test_zeroing_or_discarding_a_disk_with_a_child_is_refused(family, operation):
    base, _ = family
    with vhdx.open(base, writable=True) as disk, pytest.raises(DependentsError):
        getattr(disk, operation)(0, 8 * MiB)  # the whole disk: a whole block changes


def test_force_writes_a_disk_with_a_child_which_then_refuses_to_open(family):
    base, child = family
    with vhdx.open(base, writable=True, force=True) as disk:
        disk.write(0, b"\x22" * 4096)
    with pytest.raises(vhdx.ParentMismatchError):
        vhdx.open(child).read(0, 1)


def test_a_child_in_a_search_folder_is_found(tmp_path):
    base = create(tmp_path / "base.vhdx", 8 * MiB)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    create(elsewhere / "child.avhdx", parent=base)
    with vhdx.open(base, writable=True, search_dirs=[elsewhere]) as disk, pytest.raises(DependentsError,
                                                                                         match="elsewhere"):
        disk.write(0, b"\x22" * 4096)


def test_a_disk_without_children_is_written(family):
    _, child = family
    with vhdx.open(child, writable=True) as disk:
        disk.write(0, b"\x33" * 4096)
    with vhdx.open(child) as disk:
        assert disk.read(0, 4096) == b"\x33" * 4096


@pytest.mark.parametrize("command", [["write", "--pattern", "0x22", "--length", "4096"], ["discard", "--length", "8M"]])
def test_cli_refuses_to_write_a_disk_with_a_child_in_one_line(family, command):
    base, _ = family
    before = digest(base)
    result = CliRunner().invoke(cli, [command[0], str(base), "--offset", "0", *command[1:]])
    assert result.exit_code == 1 and "child.avhdx" in result.output and "--force" in result.output
    assert len(result.output.strip().splitlines()) == 1 and digest(base) == before


def test_cli_write_force_writes_a_disk_with_a_child(family):
    base, _ = family
    result = CliRunner().invoke(cli, ["write", str(base), "--offset", "0", "--pattern", "0x22", "--length", "4096",
                                      "--force"])
    assert result.exit_code == 0, result.output
    with vhdx.open(base) as disk:
        assert disk.read(0, 4096) == b"\x22" * 4096


def test_cli_write_looks_for_children_in_search_dir(tmp_path):
    base = create(tmp_path / "base.vhdx", 8 * MiB)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    create(elsewhere / "child.avhdx", parent=base)
    result = CliRunner().invoke(cli, ["write", str(base), "--offset", "0", "--pattern", "1", "--length", "512",
                                      "--search-dir", str(elsewhere)])
    assert result.exit_code == 1 and "elsewhere" in result.output


def test_merge_refuses_when_a_sibling_in_a_search_dir_depends_on_the_destination(tmp_path):
    base = create(tmp_path / "base.vhdx", 8 * MiB)
    child = create(tmp_path / "child.avhdx", parent=base)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    create(elsewhere / "sibling.avhdx", parent=base)
    with pytest.raises(MergeError, match="sibling.avhdx depends on the destination"):
        vhdx.merge_chain(child, search_dirs=[elsewhere])
    result = CliRunner().invoke(cli, ["merge", str(child), "--search-dir", str(elsewhere)])
    assert result.exit_code == 1 and "sibling.avhdx" in result.output
    assert Path(child).exists()
