"""Bad input never escapes as anything but ``VhdxError`` (library) or a one-line error (CLI).

Inputs: files that are not VHDX, a QEMU-made image truncated at 20 places, one flipped byte in each header,
region table, the metadata table, each metadata item and the parent locator, and structures that claim
huge lengths (which must be refused before anything that size is allocated).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import threading
import tracemalloc
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

import vhdx
from vhdx.errors import VhdxError
from vhdx.format import checksum
from vhdx.format import constants as c
from vhdx.structures.log import DataWrite, build_entry
from vhdx_cli.main import cli

MiB = 1 << 20
VIRTUAL_SIZE = 16 * MiB
WRITTEN_BLOCKS = (0, 3, 7, 12)  # never the last block, which may legally end short of the file end


DEADLINE_SECONDS = 20


def within_deadline(func, *args, fifo: Path | None = None):
    """Run ``func(*args)`` in a thread; fail (and unblock a reader stuck on ``fifo``) if it hangs."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = func(*args)
        except BaseException as exc:  # re-raised in the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(DEADLINE_SECONDS)
    if worker.is_alive():
        if fifo is not None:  # a writer end releases an open() or read() blocked on the FIFO
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
            worker.join(5)
        pytest.fail(f"{getattr(func, '__name__', func)} did not return within {DEADLINE_SECONDS}s (hang)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def read_all(path, **kwargs) -> bytes:
    with vhdx.open(path, **kwargs) as image:
        return image.read(0, image.virtual_size)


def assert_library_error(path, **kwargs) -> VhdxError:
    with pytest.raises(VhdxError) as err:
        read_all(path, **kwargs)
    return err.value


def assert_cli_one_line_error(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code in (1, 2), (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


def assert_cli_errors_for_all(path: Path, tmp_path: Path, commands=("info", "map", "convert")) -> None:
    for command in commands:
        args = [command, str(path)]
        if command == "convert":
            args += [str(tmp_path / "out.raw"), "-O", "raw"]
        assert_cli_one_line_error(args)


# --- images -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qemu_made(tmp_path_factory) -> Path:
    """A dynamic QEMU image, 1 MiB blocks and log, data in a few blocks (built once per module)."""
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: apt-get install qemu-utils)")
    path = tmp_path_factory.mktemp("robust") / "base.vhdx"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M,log_size=1M", str(path),
                    str(VIRTUAL_SIZE)], check=True, timeout=60)
    commands = []
    for i, block in enumerate(WRITTEN_BLOCKS):
        commands += ["-c", f"write -P {0x31 + i:#x} {block * MiB + 1000} {MiB - 2000}"]
    subprocess.run(["qemu-io", "-f", "vhdx", *commands, str(path)], check=True, timeout=60, capture_output=True)
    return path


@pytest.fixture()
def image_copy(qemu_made, tmp_path) -> Path:
    dest = tmp_path / "copy.vhdx"
    shutil.copyfile(qemu_made, dest)
    return dest


@pytest.fixture(scope="module")
def reference_bytes(qemu_made) -> bytes:
    return read_all(qemu_made)


@pytest.fixture(scope="module")
def layout(qemu_made):
    """File offsets of the structures of the pristine image."""
    with vhdx.open(qemu_made) as image:
        meta = image.regions.metadata.file_offset
        items = {e.name: meta + e.offset for e in image.metadata.entries}
        allocated = [int(image.bat.offsets[b]) for b in WRITTEN_BLOCKS]
        return {
            "log": image.headers.current.log_offset,
            "bat": image.regions.bat.file_offset,
            "metadata": meta,
            "items": items,
            "blocks": allocated,
            "current_header": image.headers.current_index,
            "size": image.io.real_size,
        }


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def restamp(path: Path, offset: int, size: int) -> None:
    """Recompute the CRC-32C (at +4) of the structure of ``size`` bytes at ``offset``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        buf = bytearray(f.read(size))
        checksum.stamp(buf, 4)
        f.seek(offset)
        f.write(buf)


def restamp_region_tables(path: Path) -> None:
    for off in c.REGION_TABLE_OFFSETS:
        restamp(path, off, c.REGION_TABLE_SIZE)


def patch_region_entry(path: Path, guid: uuid.UUID, *, file_offset: int | None = None, length: int | None = None):
    """Change the region entry of ``guid`` in both copies and re-stamp their CRCs."""
    for table in c.REGION_TABLE_OFFSETS:
        raw = bytearray(Path(path).read_bytes()[table : table + c.REGION_TABLE_SIZE])
        count = struct.unpack_from("<I", raw, 8)[0]
        for i in range(count):
            pos = 16 + 32 * i
            if raw[pos : pos + 16] == guid.bytes_le:
                if file_offset is not None:
                    struct.pack_into("<Q", raw, pos + 16, file_offset)
                if length is not None:
                    struct.pack_into("<I", raw, pos + 24, length)
        patch(path, table, bytes(raw))
    restamp_region_tables(path)


# --- not VHDX at all --------------------------------------------------------------------------------

def _vhd_footer() -> bytes:
    footer = bytearray(512)
    footer[0:8] = b"conectix"
    struct.pack_into(">I", footer, 8, 2)
    struct.pack_into(">I", footer, 12, 0x00010000)
    struct.pack_into(">Q", footer, 16, 0xFFFFFFFFFFFFFFFF)
    struct.pack_into(">QQ", footer, 40, 16 * MiB, 16 * MiB)
    struct.pack_into(">I", footer, 60, 2)
    struct.pack_into(">I", footer, 64, (~sum(footer) & 0xFFFFFFFF))
    return bytes(footer)


NOT_VHDX = {
    "empty": lambda p: p.write_bytes(b""),
    "text": lambda p: p.write_text("This is a plain text file, not a virtual disk.\n" * 100),
    "random": lambda p: p.write_bytes(os.urandom(2 * MiB)),
    "vhd-footer-only": lambda p: p.write_bytes(_vhd_footer()),
    "signature-only": lambda p: p.write_bytes(b"vhdxfile"),
    "directory": lambda p: p.mkdir(),
    "fifo": lambda p: os.mkfifo(p),
}


@pytest.mark.parametrize("kind", sorted(NOT_VHDX))
def test_robustness_not_vhdx_library_error(tmp_path, kind):
    path = tmp_path / f"input-{kind}"
    NOT_VHDX[kind](path)
    within_deadline(assert_library_error, path, fifo=path if kind == "fifo" else None)


@pytest.mark.parametrize("kind", sorted(NOT_VHDX))
def test_robustness_not_vhdx_cli_one_line(tmp_path, kind):
    path = tmp_path / f"input-{kind}"
    NOT_VHDX[kind](path)
    within_deadline(assert_cli_errors_for_all, path, tmp_path, fifo=path if kind == "fifo" else None)


def test_robustness_missing_file_cli_one_line(tmp_path):
    assert_cli_errors_for_all(tmp_path / "no-such.vhdx", tmp_path)


# --- truncation -------------------------------------------------------------------------------------

# name -> function(layout) giving the size to truncate the file to.
TRUNCATIONS = {
    "identifier-4": lambda L: 4,
    "identifier-creator": lambda L: 100,
    "identifier-slot-end": lambda L: 0x8000,
    "header1-start": lambda L: 0x10000 + 8,
    "header1-middle": lambda L: 0x10000 + 0x800,
    "header2-start": lambda L: 0x20000 + 4,
    "header2-end": lambda L: 0x20000 + 0xFFF,
    "region1-header": lambda L: 0x30000 + 12,
    "region1-middle": lambda L: 0x30000 + 0x8000,
    "region2-entries": lambda L: 0x40000 + 40,
    "reserved-area": lambda L: 0x80000,
    "log-start": lambda L: L["log"] + 4096,
    "log-end": lambda L: L["log"] + MiB - 1,
    "bat-first-entry": lambda L: L["bat"] + 4,
    "bat-middle": lambda L: L["bat"] + 64,
    "metadata-table": lambda L: L["metadata"] + 40,
    "metadata-items": lambda L: L["items"]["Virtual Disk Size"] + 3,
    "data-first-block": lambda L: L["blocks"][0] + 4096,
    "data-middle-block": lambda L: L["blocks"][1] + MiB // 2,
    "data-block-last-byte": lambda L: L["blocks"][2] + MiB - 1,
}


def test_robustness_truncations_are_twenty_distinct_places(layout):
    sizes = {name: fn(layout) for name, fn in TRUNCATIONS.items()}
    assert len(set(sizes.values())) == 20
    assert all(0 < s < layout["size"] for s in sizes.values())


@pytest.mark.parametrize("where", list(TRUNCATIONS))
def test_robustness_truncated_library_error(image_copy, layout, where):
    os.truncate(image_copy, TRUNCATIONS[where](layout))
    assert_library_error(image_copy)


@pytest.mark.parametrize("where", list(TRUNCATIONS))
def test_robustness_truncated_cli_one_line(image_copy, layout, where, tmp_path):
    os.truncate(image_copy, TRUNCATIONS[where](layout))
    assert_cli_errors_for_all(image_copy, tmp_path)


# --- one flipped byte -------------------------------------------------------------------------------

@pytest.mark.parametrize("slot", [0, 1])
@pytest.mark.parametrize("within", [0, 4, 8, 0x20, 0x40, 0x44, 0x800])
def test_robustness_one_bad_header_copy_still_opens(image_copy, reference_bytes, slot, within):
    flip(image_copy, c.HEADER_OFFSETS[slot] + within)
    with vhdx.open(image_copy) as image:
        assert image.headers.current_index == 1 - slot
        assert image.read(0, image.virtual_size) == reference_bytes


@pytest.mark.parametrize("within", [0, 4, 8, 0x40, 0x800])
def test_robustness_both_headers_flipped_error(image_copy, within, tmp_path):
    for off in c.HEADER_OFFSETS:
        flip(image_copy, off + within)
    assert_library_error(image_copy)
    assert_cli_errors_for_all(image_copy, tmp_path)


def test_robustness_bad_crc_header_never_chosen_despite_higher_sequence(image_copy, layout):
    stale = c.HEADER_OFFSETS[1 - layout["current_header"]]
    current = c.HEADER_OFFSETS[layout["current_header"]]
    with vhdx.open(image_copy) as image:
        chosen_guid = image.data_write_guid
        seq = image.headers.current.sequence_number
    patch(image_copy, stale + 8, struct.pack("<Q", seq + 1000))
    patch(image_copy, stale + 32, uuid.uuid4().bytes_le)  # a different DataWriteGuid, CRC left stale
    with vhdx.open(image_copy) as image:
        assert image.headers.current_copy.offset == current
        assert image.data_write_guid == chosen_guid
    # Control: with its CRC fixed, the same header does win.
    restamp(image_copy, stale, c.HEADER_SIZE)
    with vhdx.open(image_copy) as image:
        assert image.headers.current_copy.offset == stale
        assert image.headers.current.sequence_number == seq + 1000


@pytest.mark.parametrize("slot", [0, 1])
@pytest.mark.parametrize("within", [0, 4, 8, 16, 20, 40, 0x1000])
def test_robustness_one_bad_region_table_copy_still_opens(image_copy, reference_bytes, slot, within):
    flip(image_copy, c.REGION_TABLE_OFFSETS[slot] + within)
    with vhdx.open(image_copy) as image:
        assert image.regions.used_index == 1 - slot
        assert image.read(0, image.virtual_size) == reference_bytes


@pytest.mark.parametrize("within", [0, 8, 16, 40])
def test_robustness_both_region_tables_flipped_error(image_copy, within, tmp_path):
    for off in c.REGION_TABLE_OFFSETS:
        flip(image_copy, off + within)
    assert_library_error(image_copy)
    assert_cli_errors_for_all(image_copy, tmp_path)


# The metadata region has no checksum: each flip below breaks a rule the reader checks.
METADATA_TABLE_FLIPS = {
    "signature": (0, 0x01),
    "entry-count": (10, 0xFF),
    "entry0-item-id": (32, 0x01),
    "entry0-offset": (32 + 18, 0x10),
    "entry0-length": (32 + 20, 0x10),
    "entry1-length": (64 + 20, 0x10),
}


@pytest.mark.parametrize("what", list(METADATA_TABLE_FLIPS))
def test_robustness_metadata_table_flip_error(image_copy, layout, what, tmp_path):
    within, mask = METADATA_TABLE_FLIPS[what]
    flip(image_copy, layout["metadata"] + within, mask)
    assert_library_error(image_copy)
    assert_cli_errors_for_all(image_copy, tmp_path)


METADATA_ITEM_FLIPS = {
    "File Parameters": (0, 0x01),  # block size no longer a power of two
    "Virtual Disk Size": (7, 0x01),  # beyond 64 TiB
    "Logical Sector Size": (1, 0x01),  # 768
    "Physical Sector Size": (1, 0x01),  # 768
}


@pytest.mark.parametrize("item", list(METADATA_ITEM_FLIPS))
def test_robustness_metadata_item_flip_error(image_copy, layout, item, tmp_path):
    within, mask = METADATA_ITEM_FLIPS[item]
    flip(image_copy, layout["items"][item] + within, mask)
    assert_library_error(image_copy)
    assert_cli_errors_for_all(image_copy, tmp_path)


def test_robustness_metadata_virtual_disk_id_flip_is_undetectable_but_harmless(image_copy, layout, reference_bytes):
    # Any 16 bytes are a valid GUID and the metadata region carries no CRC: the file opens, data unchanged.
    flip(image_copy, layout["items"]["Virtual Disk ID"])
    assert read_all(image_copy) == reference_bytes


# --- parent locator (Windows-made child + parent) ---------------------------------------------------

@pytest.fixture()
def windows_pair(corpus_image, tmp_path):
    folder = tmp_path / "pair"
    folder.mkdir()
    for name in ("fat-parent.vhdx", "fat-differential.vhdx"):
        shutil.copyfile(corpus_image(f"dfvfs/{name}.gz"), folder / name)
    child = folder / "fat-differential.vhdx"
    with vhdx.open(child) as image:
        entry = next(e for e in image.metadata.entries if e.item_id == c.PARENT_LOCATOR_GUID)
        locator_offset = image.regions.metadata.file_offset + entry.offset
        raw = Path(child).read_bytes()[locator_offset : locator_offset + entry.length]
    return child, locator_offset, raw


def _linkage_value_offset(raw: bytes) -> int:
    count = struct.unpack_from("<H", raw, 18)[0]
    for i in range(count):
        key_off, value_off, key_len, _ = struct.unpack_from("<IIHH", raw, 20 + 12 * i)
        if raw[key_off : key_off + key_len].decode("utf-16-le") == "parent_linkage":
            return value_off
    raise AssertionError("no parent_linkage key")


LOCATOR_FLIPS = {
    "locator-type": lambda raw: (0, 0x01),
    "key-value-count": lambda raw: (18, 0x80),
    "entry0-key-offset": lambda raw: (20 + 1, 0x80),
    "entry0-value-length": lambda raw: (20 + 10, 0x01),
    # "{f88d..." -> "{g88d...": no longer a GUID, so no linkage matches the parent.
    "linkage-digit": lambda raw: (_linkage_value_offset(raw) + 2, 0x01),
}


def test_robustness_windows_pair_reads_before_any_flip(windows_pair):
    child, _, _ = windows_pair
    assert len(read_all(child)) == 4 * MiB


@pytest.mark.parametrize("what", list(LOCATOR_FLIPS))
def test_robustness_parent_locator_flip_library_error(windows_pair, what):
    child, locator_offset, raw = windows_pair
    within, mask = LOCATOR_FLIPS[what](raw)
    flip(child, locator_offset + within, mask)
    assert_library_error(child)


@pytest.mark.parametrize("what", list(LOCATOR_FLIPS))
def test_robustness_parent_locator_flip_cli_one_line(windows_pair, what, tmp_path):
    child, locator_offset, raw = windows_pair
    within, mask = LOCATOR_FLIPS[what](raw)
    flip(child, locator_offset + within, mask)
    # A linkage that matches nothing is found only when the parent is needed: info/map (which fall back to
    # the child alone with a warning) may succeed, convert may not.
    commands = ("convert",) if what == "linkage-digit" else ("info", "map", "convert")
    assert_cli_errors_for_all(child, tmp_path, commands)


# --- claimed lengths are checked before anything is allocated ---------------------------------------

def assert_fails_small(path, limit: int = 64 * MiB) -> VhdxError:
    tracemalloc.start()
    try:
        err = assert_library_error(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak allocation {peak} bytes before failing"
    return err


def test_robustness_metadata_entry_claiming_4gib_fails_fast(image_copy, layout):
    patch(image_copy, layout["metadata"] + 32 + 20, struct.pack("<I", 0xFFFFFFFF))
    assert_fails_small(image_copy)


def test_robustness_parent_locator_claiming_huge_count_fails_fast(windows_pair):
    child, locator_offset, _ = windows_pair
    patch(child, locator_offset + 18, struct.pack("<H", 0xFFFF))
    assert_fails_small(child)


def test_robustness_metadata_entry_count_huge_fails_fast(image_copy, layout):
    patch(image_copy, layout["metadata"] + 10, struct.pack("<H", 0xFFFF))
    assert_fails_small(image_copy)


def test_robustness_region_table_entry_count_huge_fails_fast(image_copy):
    for off in c.REGION_TABLE_OFFSETS:
        patch(image_copy, off + 8, struct.pack("<I", 0xFFFFFFFF))
    restamp_region_tables(image_copy)
    assert_fails_small(image_copy)


def test_robustness_bat_for_64tib_in_small_file_fails_fast(image_copy, layout):
    # 64 TiB with 1 MiB blocks needs a 512 MiB BAT: the region claims room for it, the file does not have it.
    patch(image_copy, layout["items"]["Virtual Disk Size"], struct.pack("<Q", 64 << 40))
    patch_region_entry(image_copy, c.BAT_REGION_GUID, file_offset=layout["size"] + MiB, length=0xFFF00000)
    err = assert_fails_small(image_copy)
    assert "BAT" in str(err)


def _set_header_log(path: Path, log_guid: uuid.UUID, log_length: int | None = None) -> None:
    for off in c.HEADER_OFFSETS:
        patch(path, off + 48, log_guid.bytes_le)
        if log_length is not None:
            patch(path, off + 68, struct.pack("<I", log_length))
        restamp(path, off, c.HEADER_SIZE)


def test_robustness_header_log_length_4gib_fails_fast(image_copy):
    _set_header_log(image_copy, uuid.uuid4(), 0xFFF00000)
    assert_fails_small(image_copy)


def test_robustness_log_entry_claiming_huge_length_is_ignored_without_allocating(image_copy, layout, reference_bytes):
    # An entry whose EntryLength exceeds the log is invalid (§2.3.2). A dirty log without a valid entry holds
    # nothing that was applied, so the reader opens the file as it is -- and must not allocate 4 GiB first.
    log_guid = uuid.uuid4()
    entry = bytearray(build_entry([DataWrite(layout["bat"], bytes(4096))], sequence_number=1, log_guid=log_guid,
                                  tail=0, flushed_file_offset=layout["size"], last_file_offset=layout["size"]))
    struct.pack_into("<I", entry, 8, 0xFFFFF000)
    checksum.stamp(entry, 4)
    patch(image_copy, layout["log"], bytes(entry))
    _set_header_log(image_copy, log_guid)
    tracemalloc.start()
    try:
        with vhdx.open(image_copy) as image:
            _, peak = tracemalloc.get_traced_memory()
            assert image.log.sequence == ()
            assert not image.log.needs_replay
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB
    assert read_all(image_copy) == reference_bytes


def test_robustness_valid_log_entry_control_is_replayed(image_copy, layout):
    # Control for the test above: the same entry with its true length is accepted and replayed in memory.
    log_guid = uuid.uuid4()
    entry = build_entry([DataWrite(layout["bat"], bytes(4096))], sequence_number=1, log_guid=log_guid,
                        tail=0, flushed_file_offset=layout["size"], last_file_offset=layout["size"])
    patch(image_copy, layout["log"], entry)
    _set_header_log(image_copy, log_guid)
    with vhdx.open(image_copy) as image:
        assert image.log.needs_replay
        # The replayed BAT sector is all zeros: every block now reads as not present, i.e. zeros.
        assert image.read(0, image.virtual_size) == bytes(image.virtual_size)


def test_robustness_differencing_disk_with_empty_parent_locator_is_a_format_error(tmp_path):
    # Found by fuzzing: a Parent Locator entry of length 0 in a differencing disk.
    from vhdx.ops.create import create

    parent, child = tmp_path / "p.vhdx", tmp_path / "c.avhdx"
    create(parent, 8 << 20)
    create(child, parent=parent)
    with vhdx.open(child) as image:
        entry = next(e for e in image.metadata.entries if e.name == "Parent Locator")
    raw = bytearray(child.read_bytes())
    struct.pack_into("<II", raw, entry.table_offset + 16, 0, 0)  # offset 0, length 0
    child.write_bytes(raw)
    with pytest.raises(vhdx.FormatError, match="Parent Locator"):
        vhdx.open(child)
