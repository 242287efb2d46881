"""Resize and compact in place, against a byte model: every disk reads exactly the expected bytes afterwards and
checks clean; the refusals (differencing, children, data past the end, dirty log, writer, fixed compaction)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vhdx
from tests.support.peers import need, read_with_pyvhdi
from vhdx.disk.extents import ExtentKind
from vhdx.errors import InvalidRequestError, LockedError, UnsupportedError, VhdxError
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.ops import layout_journal
from vhdx.ops.check import check_image
from vhdx.ops.compact import compact_image
from vhdx.ops.create import create
from vhdx.ops.resize import resize_image

MiB = 1 << 20
GiB = 1 << 30
# Bytes of each disk the model holds (writes stay below it); past this the disk must hold no data at all.
MODEL = 32 * MiB


class Model(bytearray):
    """The expected bytes of the first MODEL bytes of a disk, and its whole size."""

    size: int = 0


def new_model(size: int) -> Model:
    model = Model(min(size, MODEL))
    model.size = size
    return model


def read_model_span(path, size: int) -> bytes:
    with vhdx.open(path) as disk:
        return disk.read(0, min(size, MODEL))


def reads_zeros_past(path, start: int) -> bool:
    """Whether the disk reads zeros from ``start`` on (reading only the runs that hold data)."""
    with vhdx.open(path) as disk:
        if start >= disk.virtual_size:
            return True
        for run_start, length, kind, _layer, _offset in disk.extents(start, disk.virtual_size).rows():
            if kind == ExtentKind.DATA and np.frombuffer(disk.read(run_start, length), dtype=np.uint8).any():
                return False
        return True


def assert_reads(path, model: bytearray) -> None:
    with vhdx.open(path) as disk:
        assert disk.virtual_size == model.size
    assert read_model_span(path, model.size) == bytes(model)
    if model.size > MODEL:
        # Model bytes past MODEL are never written by these tests: the disk must read zeros there.
        assert reads_zeros_past(path, MODEL)


def assert_clean(path) -> None:
    report = check_image(path)
    assert report.exit_code == 0, [str(f) for f in report.all_findings]


def make_disk(folder, kind: str, size: int, block: int, sector: int, writes) -> tuple[str, bytearray]:
    path = str(folder / f"{kind}.vhdx")
    create(path, size, type=kind, block_size=block, logical_sector_size=sector)
    model = new_model(size)
    with vhdx.open(path, writable=True) as disk:
        for offset, length, value in writes:
            offset, length = offset % size, length
            length = min(length, size - offset)
            disk.write(offset, bytes([value]) * length)
            model[offset : offset + length] = bytes([value]) * length
    return path, model


def resize_model(model: Model, size: int) -> Model:
    new = new_model(size)
    n = min(len(new), len(model))
    new[:n] = model[:n]
    return new


write_st = st.tuples(st.integers(0, MODEL - 4 * MiB), st.integers(1, 3 * MiB), st.integers(0, 255))


@given(kind=st.sampled_from(["dynamic", "fixed"]), sector=st.sampled_from([512, 4096]),
       block=st.sampled_from([MiB, 2 * MiB, 4 * MiB, 32 * MiB, 256 * MiB]),
       size_mib=st.integers(1, 20), writes=st.lists(write_st, max_size=5),
       new_sizes=st.lists(st.one_of(st.integers(1, 40 * MiB), st.integers(1 * GiB, 300 * GiB)), min_size=1,
                          max_size=3))
def test_resize_up_and_down_reads_the_model(tmp_path_factory, kind, sector, block, size_mib, writes, new_sizes):
    folder = tmp_path_factory.mktemp("resize")
    path, model = make_disk(folder, kind, size_mib * MiB, block, sector, writes)
    for new in new_sizes:
        if kind == "fixed":
            new = min(new, 64 * MiB)  # fixed disks allocate every block: keep the files small
        new = max(sector, new // sector * sector)
        resize_image(path, new, force=True)
        model = resize_model(model, new)
        assert_reads(path, model)
        assert_clean(path)
    assert not os.path.exists(layout_journal.journal_path(path))
    shutil.rmtree(folder)


@given(sector=st.sampled_from([512, 4096]), block=st.sampled_from([MiB, 2 * MiB, 8 * MiB, 256 * MiB]),
       writes=st.lists(write_st, max_size=6), zeros=st.lists(st.tuples(st.integers(0, 20), st.integers(1, 8)),
                                                             max_size=3),
       mode=st.sampled_from(["full", "prezeroed", "pretrimmed"]), trim=st.booleans())
def test_compact_every_mode_reads_the_model(tmp_path_factory, sector, block, writes, zeros, mode, trim):
    folder = tmp_path_factory.mktemp("compact")
    size = 24 * MiB
    path, model = make_disk(folder, "dynamic", size, block, sector, writes)
    with vhdx.open(path, writable=True) as disk:
        for start_mib, length_mib in zeros:
            start, length = start_mib * MiB, min(length_mib * MiB, size - start_mib * MiB)
            if trim:
                disk.discard(start, length)  # whole blocks only: partial ones keep their bytes
                first, last = -(-start // block) * block, (start + length) // block * block
                if start + length == size:
                    last = size
                if last > first:
                    model[first:last] = bytes(last - first)
            else:
                disk.write(start, bytes(length))  # all-zero payload: what full/prezeroed release
                model[start : start + length] = bytes(length)
    before = os.path.getsize(path)
    result = compact_image(path, mode)
    assert_reads(path, model)
    assert_clean(path)
    assert os.path.getsize(path) == result.file_size_after <= before
    shutil.rmtree(folder)


@given(sector=st.sampled_from([512, 4096]), block=st.sampled_from([MiB, 2 * MiB, 8 * MiB]),
       base_writes=st.lists(write_st, max_size=4), child_writes=st.lists(write_st, max_size=4),
       zeros=st.lists(st.tuples(st.integers(0, 20), st.integers(1, 6)), max_size=3),
       mode=st.sampled_from(["full", "prezeroed", "pretrimmed"]))
def test_compact_differencing_child_reads_the_chain_model(tmp_path_factory, sector, block, base_writes, child_writes,
                                                         zeros, mode):
    folder = tmp_path_factory.mktemp("compact-child")
    size = 24 * MiB
    base, model = make_disk(folder, "dynamic", size, MiB, sector, base_writes)
    child = str(folder / "child.avhdx")
    create(child, parent=base, block_size=block)
    with vhdx.open(child, writable=True) as disk:
        for offset, length, value in child_writes:
            offset = offset % size  # the strategy draws offsets for a larger model disk (as make_disk does)
            length = min(length, size - offset)
            disk.write(offset, bytes([value]) * length)
            model[offset : offset + length] = bytes([value]) * length
        for start_mib, length_mib in zeros:
            start, length = start_mib * MiB, min(length_mib * MiB, size - start_mib * MiB)
            disk.write(start, bytes(length))
            model[start : start + length] = bytes(length)
    result = compact_image(child, mode)
    assert_reads(child, model)
    report = check_image(child, chain=True)
    assert report.exit_code == 0, [str(f) for f in report.all_findings]
    assert os.path.getsize(child) == result.file_size_after
    shutil.rmtree(folder)


# --- specific behaviours ---------------------------------------------------------------------------------
def test_grow_past_the_bat_region_moves_the_first_blocks_and_keeps_their_bytes(tmp_path):
    path, model = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [(0, 8 * MiB, 0x5A)])
    result = resize_image(path, 200 * GiB)  # 204800 entries: more than a 1 MiB BAT region holds
    assert result.bat_grown and not result.bat_relocated and result.blocks_moved >= 1
    assert_reads(path, resize_model(model, 200 * GiB))
    assert_clean(path)


def test_grow_fixed_allocates_the_new_blocks(tmp_path):
    path, model = make_disk(tmp_path, "fixed", 4 * MiB, MiB, 512, [(0, 4 * MiB, 7)])
    resize_image(path, 10 * MiB)
    with vhdx.open(path) as disk:
        assert disk.disk_type == c.DiskType.FIXED
        assert disk.bat.state_counts() == {"FULLY_PRESENT": 10}
    assert_reads(path, resize_model(model, 10 * MiB))
    assert_clean(path)


def test_grow_does_not_bring_back_bytes_cut_by_an_earlier_shrink(tmp_path):
    path, model = make_disk(tmp_path, "dynamic", 8 * MiB, 4 * MiB, 512, [(0, 8 * MiB, 0xEE)])
    resize_image(path, 3 * MiB, force=True)  # cuts inside the first block and drops the second
    resize_image(path, 8 * MiB)
    assert_reads(path, resize_model(resize_model(model, 3 * MiB), 8 * MiB))


def test_shrink_is_refused_while_data_lies_past_the_new_size(tmp_path):
    path, _ = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [(6 * MiB + 4096, 10, 1)])
    with pytest.raises(InvalidRequestError, match=r"10 bytes that are not zero .* offset 6295552") as refused:
        resize_image(path, 6 * MiB)
    assert refused.value.hint == "cut"
    with vhdx.open(path) as disk:
        assert disk.virtual_size == 8 * MiB


def test_shrink_over_allocated_zeros_needs_no_force(tmp_path):
    path, model = make_disk(tmp_path, "fixed", 8 * MiB, MiB, 512, [(0, MiB, 3)])
    resize_image(path, 2 * MiB)
    assert_reads(path, resize_model(model, 2 * MiB))
    assert os.path.getsize(path) < 8 * MiB  # the cut blocks left the file


def test_shrink_with_force_reports_what_it_cut(tmp_path):
    path, _ = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [(7 * MiB, 100, 9)])
    result = resize_image(path, MiB, force=True)
    assert result.data_bytes_cut == 100 and "cut 100 bytes" in result.warnings[0]


def test_differencing_disk_cannot_be_resized_alone(tmp_path):
    base, _ = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [])
    child = str(tmp_path / "child.avhdx")
    create(child, parent=base)
    with pytest.raises(UnsupportedError, match="differencing disk cannot change size alone"):
        resize_image(child, 16 * MiB)


def test_parent_with_children_is_refused_unless_forced(tmp_path):
    base, _ = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [])
    child = str(tmp_path / "child.avhdx")
    create(child, parent=base)
    with pytest.raises(InvalidRequestError, match="child.avhdx depends on this disk") as refused:
        resize_image(base, 16 * MiB)
    assert refused.value.hint == "force"
    result = resize_image(base, 16 * MiB, force=True)
    assert "will no longer open" in result.warnings[0]
    with pytest.raises(VhdxError), vhdx.open(child) as disk:
        disk.read(0, 4096)


@pytest.mark.parametrize("operation", ["resize", "compact"])
def test_dirty_log_is_refused_with_a_repair_hint(tmp_path, operation):
    path, _ = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [(0, MiB, 1)])
    disk = vhdx.open(path, writable=True)
    disk.write(3 * MiB, b"x" * 4096)
    disk.flush()  # committed through the log; the header still names it (no close)
    disk.io.close()
    with pytest.raises(VhdxError, match="vhdx repair"):
        resize_image(path, 16 * MiB) if operation == "resize" else compact_image(path)


def test_a_disk_open_for_writing_elsewhere_is_refused(tmp_path):
    path, _ = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [])
    holder = ImageIO.open(path, writable=True)
    try:
        with pytest.raises(LockedError):
            resize_image(path, 16 * MiB)
        with pytest.raises(LockedError):
            compact_image(path)
    finally:
        holder.close()


def test_compact_refuses_a_fixed_disk(tmp_path):
    path, _ = make_disk(tmp_path, "fixed", 4 * MiB, MiB, 512, [])
    with pytest.raises(UnsupportedError, match="make a dynamic copy") as refused:
        compact_image(path)
    assert refused.value.hint == "dynamic_copy"


def test_compact_releases_zero_blocks_and_trimmed_space_and_shrinks_the_file(tmp_path):
    path, model = make_disk(tmp_path, "dynamic", 16 * MiB, MiB, 512, [(0, 16 * MiB, 0x42)])
    with vhdx.open(path, writable=True) as disk:
        disk.write(2 * MiB, bytes(3 * MiB))
        disk.discard(8 * MiB, 4 * MiB)
    model[2 * MiB : 5 * MiB] = bytes(3 * MiB)
    model[8 * MiB : 12 * MiB] = bytes(4 * MiB)
    before = os.path.getsize(path)
    result = compact_image(path)
    assert (result.zero_blocks_released, result.trimmed_blocks_released) == (3, 4)
    assert before - os.path.getsize(path) == 7 * MiB == result.bytes_released
    assert_reads(path, model)
    assert_clean(path)


def test_dry_run_changes_nothing(tmp_path):
    path, _ = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [(0, 8 * MiB, 1)])
    with vhdx.open(path, writable=True) as disk:
        disk.write(0, bytes(2 * MiB))
    before = Path(path).read_bytes()
    result = compact_image(path, dry_run=True)
    assert result.zero_blocks_released == 2 and result.file_size_after is None
    assert resize_image(path, MiB, dry_run=True, force=True).new_size == MiB
    assert Path(path).read_bytes() == before


def test_pretrimmed_keeps_zero_payload_blocks_and_prezeroed_keeps_trimmed_space(tmp_path):
    path, _ = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [(0, 8 * MiB, 1)])
    with vhdx.open(path, writable=True) as disk:
        disk.write(0, bytes(MiB))
        disk.discard(4 * MiB, MiB)
    trimmed = compact_image(path, "prezeroed")
    assert (trimmed.zero_blocks_released, trimmed.trimmed_blocks_released) == (1, 0)
    zeroed = compact_image(path, "pretrimmed")
    assert (zeroed.zero_blocks_released, zeroed.trimmed_blocks_released) == (0, 1)


def test_compact_child_releases_zero_blocks_only_where_the_parent_reads_zero(tmp_path):
    base, _ = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [(0, 2 * MiB, 0x77)])
    child = str(tmp_path / "child.avhdx")
    create(child, parent=base, block_size=MiB)
    with vhdx.open(child, writable=True) as disk:
        disk.write(0, bytes(MiB))  # hides parent data: must stay
        disk.write(4 * MiB, bytes(MiB))  # parent reads zeros there: released
        disk.write(6 * MiB, b"\x01" * MiB)
        disk.write(7 * MiB + 512, b"\x02" * 512)  # partially present: kept
    with vhdx.open(child) as disk:
        expected = disk.read(0, disk.virtual_size)
    result = compact_image(child)
    assert (result.zero_blocks_released, result.kept_over_parent_data, result.kept_partial) == (1, 1, 1)
    with vhdx.open(child) as disk:
        assert disk.read(0, disk.virtual_size) == expected
        assert disk.bat.states[4] == c.BatState.NOT_PRESENT
    report = check_image(child, chain=True)
    assert report.exit_code == 0, [str(f) for f in report.all_findings]


def test_compact_keeps_the_data_write_guid_so_children_stay_valid(tmp_path):
    base, _ = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [(0, 8 * MiB, 5)])
    with vhdx.open(base, writable=True) as disk:
        disk.write(MiB, bytes(MiB))
    child = str(tmp_path / "child.avhdx")
    create(child, parent=base)
    with pytest.raises(InvalidRequestError, match="depends on this disk"):
        compact_image(base)
    compact_image(base, force=True)
    with vhdx.open(child) as disk:
        assert disk.read(MiB, MiB) == bytes(MiB) and disk.read(0, 16) == b"\x05" * 16


def test_a_pending_operation_must_be_resumed_before_another_starts(tmp_path):
    path, _ = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [])
    layout_journal.write_journal(layout_journal.LayoutJournal("resize", path, size=16 * MiB))
    with pytest.raises(InvalidRequestError, match="interrupted resize of this disk is pending") as refused:
        compact_image(path)
    assert refused.value.hint == "resume"
    with pytest.raises(InvalidRequestError, match="is a resize") as refused:
        compact_image(path, resume=True)
    assert refused.value.hint == "resume"
    resize_image(path, resume=True)
    with vhdx.open(path) as disk:
        assert disk.virtual_size == 16 * MiB
    assert not os.path.exists(layout_journal.journal_path(path))


def test_resume_without_a_record_says_so(tmp_path):
    path, _ = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [])
    with pytest.raises(InvalidRequestError, match="no interrupted"):
        resize_image(path, resume=True)


def test_zero_scan_ignores_bytes_past_the_end_of_the_last_block(tmp_path):
    path = str(tmp_path / "odd.vhdx")
    create(path, 3 * MiB + 512, block_size=2 * MiB)
    with vhdx.open(path, writable=True) as disk:
        disk.write(2 * MiB, bytes(MiB + 512))
        offset = int(disk.bat.offsets[1])
    with open(path, "r+b") as f:  # stale bytes past the virtual end inside the last block
        f.seek(offset + MiB + 512)
        f.write(b"\xff" * 512)
    assert compact_image(path).zero_blocks_released == 1
    assert np.all(np.frombuffer(read_model_span(path, 3 * MiB + 512), dtype=np.uint8) == 0)


# --- peers -------------------------------------------------------------------------------------------------
def qemu(*args) -> bytes:
    return subprocess.run(args, check=True, capture_output=True).stdout


@pytest.mark.peer
def test_qemu_img_checks_and_reads_resized_and_compacted_disks(tmp_path):
    qemu_img = need("qemu-img")
    path, model = make_disk(tmp_path, "dynamic", 16 * MiB, MiB, 512, [(0, 16 * MiB, 0x31), (3 * MiB, 2 * MiB, 0)])
    with vhdx.open(path, writable=True) as disk:
        disk.discard(8 * MiB, 2 * MiB)
    model[8 * MiB : 10 * MiB] = bytes(2 * MiB)
    for step in (lambda: resize_image(path, 40 * MiB), lambda: compact_image(path),
                 lambda: resize_image(path, 11 * MiB + 512, force=True), lambda: compact_image(path)):
        step()
        qemu(qemu_img, "check", "-f", "vhdx", path)  # exit status 0: no errors, no leaks
        raw = tmp_path / "out.raw"
        qemu(qemu_img, "convert", "-f", "vhdx", "-O", "raw", path, str(raw))
        with vhdx.open(path) as disk:
            assert raw.read_bytes() == disk.read(0, disk.virtual_size)
    assert raw.read_bytes() == bytes(model[: 11 * MiB + 512])


@pytest.mark.peer
def test_qemu_reads_a_disk_whose_bat_grew_in_place(tmp_path):
    qemu_img, qemu_io = need("qemu-img"), need("qemu-io")
    path, _ = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [(0, 8 * MiB, 0x5A)])
    resize_image(path, 200 * GiB)
    qemu(qemu_img, "check", "-f", "vhdx", path)
    out = qemu(qemu_io, "-f", "vhdx", "-r", "-c", "read -P 0x5a 0 8M", "-c", f"read -P 0 {200 * GiB - 8 * MiB} 8M",
               path)
    assert b"Pattern verification failed" not in out


@pytest.mark.peer
def test_libvhdi_reads_a_compacted_child_like_we_do(tmp_path):
    base, _ = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [(0, 3 * MiB, 0x77)])
    child = str(tmp_path / "child.avhdx")
    create(child, parent=base, block_size=MiB)
    with vhdx.open(child, writable=True) as disk:
        disk.write(0, bytes(MiB))
        disk.write(4 * MiB, bytes(2 * MiB))
        disk.write(7 * MiB, b"\x09" * MiB)
        disk.discard(6 * MiB, MiB)
    compact_image(child)
    with vhdx.open(child) as disk:
        ours = disk.read(0, disk.virtual_size)
    assert read_with_pyvhdi([child, base], 8 * MiB) == ours


def test_compact_reports_progress_in_bytes_scanned_then_moved(tmp_path):
    path, _ = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [(0, 8 * MiB, 1)])
    with vhdx.open(path, writable=True) as disk:
        disk.write(0, bytes(2 * MiB))
    seen = []
    result = compact_image(path, progress=seen.append)
    assert seen[0] > 0 and 8 * MiB in seen  # the zero scan covered all 8 present blocks
    assert seen[-1] == result.blocks_moved * MiB == 2 * MiB


@pytest.mark.peer
def test_grow_a_qemu_disk_moves_the_metadata_region_that_follows_its_bat(tmp_path):
    qemu_img, qemu_io = need("qemu-img"), need("qemu-io")
    path = str(tmp_path / "q.vhdx")
    qemu(qemu_img, "create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "64M")  # BAT at 2 MiB, metadata at 3
    qemu(qemu_io, "-f", "vhdx", "-c", "write -P 0x6b 0 5M", "-c", "write -P 0x6c 60M 4M", path)
    with vhdx.open(path) as disk:
        expected = disk.read(0, 64 * MiB)
    leaked = check_image(path).leaked_bytes  # QEMU leaves 4 MiB unreferenced after its first data block
    result = resize_image(path, 200 * GiB)
    assert result.bat_grown and result.metadata_moved and not result.bat_relocated
    assert reads_zeros_past(path, 64 * MiB)
    with vhdx.open(path) as disk:
        assert disk.read(0, 64 * MiB) == expected and disk.virtual_size == 200 * GiB
    report = check_image(path)
    assert not report.errors and report.leaked_bytes == leaked, [str(f) for f in report.all_findings]
    qemu(qemu_img, "check", "-f", "vhdx", path)
    out = qemu(qemu_io, "-f", "vhdx", "-r", "-c", "read -P 0x6c 60M 4M", "-c", f"read -P 0 {100 * GiB} 1M", path)
    assert b"Pattern verification failed" not in out


def _on_disk(path) -> int:
    return os.stat(path).st_blocks * 512


def test_grow_to_64_tib_leaves_the_new_bat_space_as_holes(tmp_path):
    path = str(tmp_path / "big.vhdx")
    create(path, 1 << 40, block_size=MiB)
    with vhdx.open(path, writable=True) as disk:
        disk.write(5 * GiB, b"\x5a" * MiB)
    result = resize_image(path, 64 << 40)  # a 512 MiB BAT region
    assert result.bat_grown
    assert os.path.getsize(path) > 512 * MiB and _on_disk(path) < 16 * MiB
    with vhdx.open(path) as disk:
        assert disk.read(5 * GiB, MiB) == b"\x5a" * MiB and disk.read(60 << 40, MiB) == bytes(MiB)
    assert_clean(path)


@pytest.mark.peer
def test_grow_a_qemu_disk_to_64_tib_leaves_the_new_bat_space_as_holes(tmp_path):
    qemu_img = need("qemu-img")
    path = str(tmp_path / "q.vhdx")
    qemu(qemu_img, "create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "1T")
    resize_image(path, 64 << 40)
    assert _on_disk(path) < 32 * MiB  # qemu-img's own 8 MiB BAT of ZERO entries, and no new zeros
    qemu(qemu_img, "check", "-f", "vhdx", path)


def test_grow_past_a_region_that_cannot_move_relocates_the_bat_and_leaves_its_new_space_as_holes(tmp_path):
    """An optional region of unknown purpose right after the BAT cannot be moved: the grown BAT goes to the end of
    the file, its entries past the old ones a hole, and the disk reads and checks as before."""
    import uuid as uuid_module

    from vhdx.structures.region import RegionEntry, build_region_table

    path, model = make_disk(tmp_path, "dynamic", 8 * MiB, MiB, 512, [])
    with vhdx.open(path) as disk:
        entries = list(disk.regions.entries)
        bat = disk.regions.bat
    blocker = RegionEntry(uuid_module.UUID("6c1d4f1e-0b5e-4a6f-9d0a-6e2f3b7a9c11"), bat.end, MiB, required=False)
    table = build_region_table([*entries, blocker])
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size < blocker.end:
            os.ftruncate(fd, blocker.end)
        for offset in c.REGION_TABLE_OFFSETS:
            os.pwrite(fd, table, offset)
    finally:
        os.close(fd)
    with vhdx.open(path, writable=True) as disk:  # its blocks go after the new region
        disk.write(0, b"\x3c" * (2 * MiB))
    model[: 2 * MiB] = b"\x3c" * (2 * MiB)
    assert_clean(path)
    result = resize_image(path, 4 << 40)  # 4 TiB of 1 MiB blocks: a 32 MiB BAT
    assert result.bat_grown and result.bat_relocated
    assert_reads(path, resize_model(model, 4 << 40))
    assert reads_zeros_past(path, 8 * MiB)
    assert_clean(path)
    assert _on_disk(path) < 12 * MiB  # the 32 MiB of new entries are a hole, not zeros written
    with vhdx.open(path) as disk:
        assert any(e.guid == blocker.guid and e.file_offset == blocker.file_offset for e in disk.regions.entries)
