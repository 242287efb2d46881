"""Finding a differencing disk's parent, with the real Windows-made pair dfvfs/fat-differential + fat-parent.

Covers the locator's relative path, explicit --parent, search folders, parents that are not regular files,
linkage mismatches, loops, orphan reads and the ZERO state in a child (zeros, never the parent).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import threading
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

import vhdx
from vhdx.disk.extents import ExtentKind
from vhdx.errors import ChainLoopError, ParentMismatchError, ParentNotFoundError, VhdxError
from vhdx.format import checksum
from vhdx.format import constants as c
from vhdx_cli.main import cli

MiB = 1 << 20
CHILD = "fat-differential.vhdx"
PARENT = "fat-parent.vhdx"
# sha256 of the child's virtual disk read over its parent (MANIFEST: dissect and libvhdi agree).
CHILD_OVER_PARENT = "a538161f34bc44c12bf9a542ce9218741c62728723ea18d0e4f6ea92e9f32e93"
PARENT_DATA_WRITE_GUID = uuid.UUID("f88d4d92-6fcc-408d-9bef-9b7c89f15c89")
DEADLINE_SECONDS = 20


def within_deadline(func, *args, fifo: Path | None = None, **kwargs):
    """Run ``func`` in a thread; fail (and unblock a reader stuck on ``fifo``) if it does not return in time."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = func(*args, **kwargs)
        except BaseException as exc:  # re-raised in the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(DEADLINE_SECONDS)
    if worker.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(5)
        pytest.fail(f"did not return within {DEADLINE_SECONDS}s (hang)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def sha256_of_disk(path, **kwargs) -> str:
    with vhdx.open(path, **kwargs) as image:
        return hashlib.sha256(image.read(0, image.virtual_size)).hexdigest()


def read_disk(path, **kwargs) -> bytes:
    with vhdx.open(path, **kwargs) as image:
        return image.read(0, image.virtual_size)


@pytest.fixture()
def pair(corpus_image, tmp_path) -> tuple[Path, Path]:
    folder = tmp_path / "chain"
    folder.mkdir()
    for name in (CHILD, PARENT):
        shutil.copyfile(corpus_image(f"dfvfs/{name}.gz"), folder / name)
    return folder / CHILD, folder / PARENT


def move_parent_away(parent: Path, tmp_path: Path) -> Path:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = elsewhere / PARENT
    parent.rename(moved)
    return moved


def set_data_write_guid(path: Path, guid: uuid.UUID) -> None:
    """Change DataWriteGuid in both headers and re-stamp both CRCs (a parent modified since the snapshot)."""
    with open(path, "r+b") as f:
        for off in c.HEADER_OFFSETS:
            f.seek(off)
            raw = bytearray(f.read(c.HEADER_SIZE))
            raw[32:48] = guid.bytes_le
            checksum.stamp(raw, c.HEADER_CHECKSUM_OFFSET)
            f.seek(off)
            f.write(raw)


# --- finding the parent -----------------------------------------------------------------------------

def test_chain_relative_path_resolves_next_to_child(pair):
    child, _ = pair
    with vhdx.open(child) as image:
        assert image.params.parent_locator.get("relative_path") == ".\\fat-parent.vhdx"
        assert hashlib.sha256(image.read(0, image.virtual_size)).hexdigest() == CHILD_OVER_PARENT
        assert image.parent_source == "relative_path"
        assert image.parent.data_write_guid == PARENT_DATA_WRITE_GUID


def test_chain_works_from_another_working_directory(pair, tmp_path, monkeypatch):
    child, _ = pair
    monkeypatch.chdir(tmp_path)
    assert sha256_of_disk(os.path.relpath(child, tmp_path)) == CHILD_OVER_PARENT


def test_chain_parent_moved_raises_parent_not_found_naming_paths(pair, tmp_path):
    child, parent = pair
    move_parent_away(parent, tmp_path)
    with pytest.raises(ParentNotFoundError) as err:
        read_disk(child)
    assert str(parent) in err.value.tried
    assert str(parent) in str(err.value)
    assert "\n" not in str(err.value)


def test_chain_parent_not_needed_for_child_only_range(pair, tmp_path):
    # Block 0 is PARTIALLY_PRESENT: sectors held by the child read without the parent being opened.
    child, parent = pair
    with vhdx.open(child, orphan=True) as image:
        data_run = next(r for r in image.extents().rows() if r[2] == ExtentKind.DATA)
    move_parent_away(parent, tmp_path)
    with vhdx.open(child) as image:
        assert len(image.read(data_run[0], data_run[1])) == data_run[1]


def test_chain_explicit_parent_overrides_locator(pair, tmp_path):
    child, parent = pair
    moved = move_parent_away(parent, tmp_path)
    with vhdx.open(child, parent=moved) as image:
        assert hashlib.sha256(image.read(0, image.virtual_size)).hexdigest() == CHILD_OVER_PARENT
        assert image.parent_source == "--parent"


def test_chain_explicit_parent_cli_convert(pair, tmp_path):
    child, parent = pair
    moved = move_parent_away(parent, tmp_path)
    out = tmp_path / "flat.raw"
    result = CliRunner().invoke(cli, ["convert", str(child), str(out), "-O", "raw", "--parent", str(moved)])
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(out.read_bytes()).hexdigest() == CHILD_OVER_PARENT


def test_chain_search_dir_finds_parent_by_name(pair, tmp_path):
    child, parent = pair
    moved = move_parent_away(parent, tmp_path)
    with vhdx.open(child, search_dirs=[moved.parent]) as image:
        assert hashlib.sha256(image.read(0, image.virtual_size)).hexdigest() == CHILD_OVER_PARENT
        assert image.parent_source == "search dir"


def test_chain_search_dir_cli_map(pair, tmp_path):
    child, parent = pair
    moved = move_parent_away(parent, tmp_path)
    result = CliRunner().invoke(cli, ["map", "--json", str(child), "--search-dir", str(moved.parent)])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    assert str(moved) in result.stdout


# --- parents that are not regular files -------------------------------------------------------------

def test_chain_parent_replaced_by_fifo_errors_without_hanging(pair):
    child, parent = pair
    parent.unlink()
    os.mkfifo(parent)
    with pytest.raises(ParentNotFoundError) as err:
        within_deadline(read_disk, child, fifo=parent)
    assert "not a regular file" in str(err.value)


def test_chain_parent_replaced_by_directory_errors(pair):
    child, parent = pair
    parent.unlink()
    parent.mkdir()
    with pytest.raises(ParentNotFoundError) as err:
        within_deadline(read_disk, child)
    assert "not a regular file" in str(err.value)


def test_chain_parent_replaced_by_dangling_symlink_errors(pair, tmp_path):
    child, parent = pair
    parent.unlink()
    parent.symlink_to(tmp_path / "nowhere.vhdx")
    with pytest.raises(ParentNotFoundError) as err:
        within_deadline(read_disk, child)
    assert str(parent) in str(err.value)


def test_chain_parent_symlink_to_real_parent_is_followed(pair, tmp_path):
    child, parent = pair
    moved = move_parent_away(parent, tmp_path)
    parent.symlink_to(moved)
    assert sha256_of_disk(child) == CHILD_OVER_PARENT


def test_chain_fifo_parent_cli_one_line_error(pair, tmp_path):
    child, parent = pair
    parent.unlink()
    os.mkfifo(parent)
    result = within_deadline(CliRunner().invoke, cli, ["convert", str(child), str(tmp_path / "o.raw"), "-O", "raw"],
                             fifo=parent)
    assert result.exit_code in (1, 2)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "not a regular file" in result.stderr


# --- linkage ----------------------------------------------------------------------------------------

def test_chain_modified_parent_raises_parent_mismatch(pair):
    child, parent = pair
    set_data_write_guid(parent, uuid.UUID("11111111-2222-3333-4444-555555555555"))
    with vhdx.open(parent) as image:  # the re-stamped parent is itself a valid file
        assert image.data_write_guid == uuid.UUID("11111111-2222-3333-4444-555555555555")
    with pytest.raises(ParentMismatchError) as err:
        read_disk(child)
    assert str(PARENT_DATA_WRITE_GUID) in str(err.value)


def test_chain_modified_parent_opens_with_ignore_id_mismatch(pair):
    child, parent = pair
    set_data_write_guid(parent, uuid.UUID("11111111-2222-3333-4444-555555555555"))
    assert sha256_of_disk(child, ignore_id_mismatch=True) == CHILD_OVER_PARENT


def test_chain_parent_linkage2_is_accepted(pair):
    # §2.6.2.6.2: a parent whose DataWriteGuid equals parent_linkage2 is also the right parent. Rewrite the
    # child's empty parent_linkage2 value to the parent's (new) GUID and give the parent that GUID.
    child, parent = pair
    new_guid = uuid.UUID("abcdefab-cdef-abcd-efab-cdefabcdefab")
    with vhdx.open(child) as image:
        entry = next(e for e in image.metadata.entries if e.item_id == c.PARENT_LOCATOR_GUID)
        base = image.regions.metadata.file_offset + entry.offset
    raw = bytearray(child.read_bytes()[base : base + entry.length])
    count = struct.unpack_from("<H", raw, 18)[0]
    for i in range(count):
        key_off, value_off, key_len, value_len = struct.unpack_from("<IIHH", raw, 20 + 12 * i)
        if raw[key_off : key_off + key_len].decode("utf-16-le") == "parent_linkage2":
            text = ("{" + str(new_guid) + "}").encode("utf-16-le")
            assert len(text) == value_len
            raw[value_off : value_off + value_len] = text
    with open(child, "r+b") as f:
        f.seek(base)
        f.write(raw)
    set_data_write_guid(parent, new_guid)
    assert sha256_of_disk(child) == CHILD_OVER_PARENT


def test_chain_loop_raises_chain_loop_error(pair):
    # The parent's name now holds a copy of the child, whose locator names that same file: a loop.
    child, parent = pair
    parent.unlink()
    shutil.copyfile(child, parent)
    with pytest.raises(ChainLoopError):
        within_deadline(read_disk, child, ignore_id_mismatch=True)


def test_chain_loop_without_ignore_is_a_mismatch(pair):
    child, parent = pair
    parent.unlink()
    shutil.copyfile(child, parent)
    with pytest.raises((ParentMismatchError, ChainLoopError)):
        within_deadline(read_disk, child)


# --- orphan reads and the ZERO state ----------------------------------------------------------------

def test_chain_orphan_reads_absent_sectors_as_zeros(pair, tmp_path):
    child, parent = pair
    full = read_disk(child)
    with vhdx.open(child, orphan=True) as image:
        rows = list(image.extents().rows())
        alone = image.read(0, image.virtual_size)
    expected = bytearray(len(full))
    for start, length, kind, _layer, _fo in rows:
        if kind == ExtentKind.DATA:
            expected[start : start + length] = full[start : start + length]
    assert any(kind == ExtentKind.ABSENT for _, _, kind, _, _ in rows)
    assert alone == bytes(expected)
    assert alone != full
    move_parent_away(parent, tmp_path)
    assert read_disk(child, orphan=True) == alone  # and no parent is needed for it


def patch_child_block_state(child: Path, block: int, state: int) -> None:
    with vhdx.open(child) as image:
        index = int(image.geometry.payload_index(block))
        where = image.bat.entry_file_offset(index)
    with open(child, "r+b") as f:
        f.seek(where)
        value = struct.unpack("<Q", f.read(8))[0]
        f.seek(where)
        f.write(struct.pack("<Q", (value & ~0x7) | state))


def fill_parent_block(parent: Path, block: int, byte: int) -> bytes:
    """Overwrite a (fixed) parent's payload block in place; its DataWriteGuid stays, so the link holds."""
    with vhdx.open(parent) as image:
        where, size = int(image.bat.offsets[block]), image.block_size
        assert int(image.bat.states[block]) == vhdx.BatState.FULLY_PRESENT
    data = bytes([byte]) * size
    with open(parent, "r+b") as f:
        f.seek(where)
        f.write(data)
    return data


def test_chain_zero_block_in_child_reads_zeros_not_parent(pair):
    child, parent = pair
    # The FAT parent's block 1 is all zeros: give it content, or the test could not tell parent from zeros.
    parent_block1 = fill_parent_block(parent, 1, 0xA7)
    block_size = len(parent_block1)
    with vhdx.open(child) as image:
        assert int(image.bat.states[1]) == vhdx.BatState.NOT_PRESENT
        assert image.read(block_size, block_size) == parent_block1
    patch_child_block_state(child, 1, vhdx.BatState.ZERO)
    with vhdx.open(child) as image:
        assert image.read(block_size, block_size) == bytes(block_size)


def test_chain_zero_block_in_child_never_opens_parent(pair, tmp_path):
    child, parent = pair
    patch_child_block_state(child, 1, vhdx.BatState.ZERO)
    move_parent_away(parent, tmp_path)
    with vhdx.open(child) as image:
        block_size = image.block_size
        assert image.read(block_size, block_size) == bytes(block_size)
        with pytest.raises(ParentNotFoundError):
            image.read(0, block_size)


@pytest.mark.parametrize("state", [vhdx.BatState.UNDEFINED, vhdx.BatState.UNMAPPED, vhdx.BatState.UNMAPPED_V095])
def test_chain_unmapped_and_undefined_in_child_read_zeros(pair, state):
    child, parent = pair
    fill_parent_block(parent, 1, 0x5C)
    patch_child_block_state(child, 1, state)
    with vhdx.open(child) as image:
        assert image.read(image.block_size, image.block_size) == bytes(image.block_size)


def test_chain_errors_are_vhdx_errors(pair, tmp_path):
    child, parent = pair
    move_parent_away(parent, tmp_path)
    with pytest.raises(VhdxError):
        read_disk(child)
