"""Merge engine: plan_merge on small arrays (one behaviour each), then real merges checked against a model of
the bytes, our reader, libvhdi (pyvhdi), dissect.hypervisor and qemu-img, plus the safety checks."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

import vhdx
from tests.support.merge_chains import build_chain, read_view
from tests.support.peers import need, read_with_dissect, read_with_pyvhdi
from vhdx.errors import MergeError
from vhdx.format import constants as c
from vhdx.ops.check import check_image
from vhdx.ops.create import create
from vhdx.ops.merge import DestArrays, LayerArrays, MergePlan, plan_merge
from vhdx_cli.main import cli

MiB = 1 << 20
BS = c.BatState
F, P, N, Z, U = BS.FULLY_PRESENT, BS.PARTIALLY_PRESENT, BS.NOT_PRESENT, BS.ZERO, BS.UNMAPPED
SS = 512
SPB = MiB // SS


def layer(states, offsets=None, bits=None, block=MiB, size=None):
    size = size or len(states) * block
    return LayerArrays.build(size, block, SS, states, offsets, bits)


def dest(states, kind="dynamic", offsets=None, bits=None, block=MiB, alloc_base=100 * MiB, reusable=None):
    arr = layer(states, offsets, bits, block)
    chunks = 1
    return DestArrays(arr, kind, np.ones(chunks, bool) if any(s == P for s in states) else np.zeros(chunks, bool),
                      np.full(chunks, 50 * MiB, np.int64),
                      np.zeros(len(states), bool) if reusable is None else np.asarray(reusable, bool),
                      alloc_base, alloc_base)


def bits(*runs):
    out = np.zeros(SPB, np.uint8)
    for lo, hi in runs:
        out[lo:hi] = 1
    return out


# --- plan_merge on arrays ---------------------------------------------------------------------------------
def test_plan_merge_takes_each_block_from_the_topmost_layer_holding_it():
    child = layer([F, N], [10 * MiB, 0])
    middle = layer([F, F], [20 * MiB, 21 * MiB])
    plan = plan_merge([child, middle], dest([F, F], offsets=[1 * MiB, 2 * MiB]))
    assert plan.block_source.tolist() == [0, 1]
    assert plan.copy_layer.tolist() == [0, 1]
    assert plan.copy_src.tolist() == [10 * MiB, 21 * MiB]


def test_plan_merge_coalesces_copies_contiguous_in_source_and_destination():
    child = layer([F, F, F], [10 * MiB, 11 * MiB, 12 * MiB])
    plan = plan_merge([child], dest([F, F, F], offsets=[1 * MiB, 2 * MiB, 3 * MiB]))
    assert (plan.copy_src.tolist(), plan.copy_dst.tolist(), plan.copy_len.tolist()) == (
        [10 * MiB], [1 * MiB], [3 * MiB])


def test_plan_merge_copies_only_the_sector_runs_of_a_partial_block():
    child = layer([P], [10 * MiB], {0: bits((3, 5), (100, 101))})
    plan = plan_merge([child], dest([F], offsets=[1 * MiB]))
    assert plan.copy_src.tolist() == [10 * MiB + 3 * SS, 10 * MiB + 100 * SS]
    assert plan.copy_dst.tolist() == [1 * MiB + 3 * SS, 1 * MiB + 100 * SS]
    assert plan.copy_len.tolist() == [2 * SS, SS]


def test_plan_merge_resolves_sectors_through_stacked_partial_layers():
    child = layer([P], [10 * MiB], {0: bits((0, 4))})
    middle = layer([P], [20 * MiB], {0: bits((2, 8))})
    plan = plan_merge([child, middle], dest([F], offsets=[1 * MiB]))
    assert list(zip(plan.copy_layer.tolist(), plan.copy_src.tolist(), plan.copy_len.tolist(), strict=True)) == [
        (0, 10 * MiB, 4 * SS), (1, 20 * MiB + 4 * SS, 4 * SS)]


def test_plan_merge_whole_zero_block_becomes_zero_state_in_a_dynamic_destination():
    plan = plan_merge([layer([Z])], dest([F], offsets=[1 * MiB]))
    assert (plan.bat_blocks.tolist(), plan.bat_states.tolist(), plan.bat_offsets.tolist()) == ([0], [Z], [1 * MiB])
    assert plan.bytes_to_copy == plan.bytes_to_zero == 0


def test_plan_merge_whole_zero_block_is_written_as_zeros_in_a_fixed_destination():
    plan = plan_merge([layer([U])], dest([F], kind="fixed", offsets=[1 * MiB]))
    assert (plan.zero_dst.tolist(), plan.zero_len.tolist()) == ([1 * MiB], [MiB])
    assert len(plan.bat_blocks) == 0


def test_plan_merge_zero_over_a_block_that_reads_zeros_changes_nothing():
    plan = plan_merge([layer([Z])], dest([N]))
    assert plan.blocks_touched == 1 and len(plan.bat_blocks) == 0 and plan.new_blocks == 0


def test_plan_merge_not_present_child_block_leaves_the_destination_alone():
    plan = plan_merge([layer([N, N])], dest([F, N], offsets=[1 * MiB, 0]))
    assert plan.blocks_touched == 0 and plan.bytes_to_copy == 0 and len(plan.bat_blocks) == 0


def test_plan_merge_differencing_destination_ors_sector_bitmaps():
    child = layer([P], [10 * MiB], {0: bits((0, 8))})
    plan = plan_merge([child], dest([P], kind="differencing", offsets=[1 * MiB], bits={0: bits((100, 108))}))
    got = np.unpackbits(plan.bitmap_bytes[0], bitorder="little")
    assert np.array_equal(got, bits((0, 8), (100, 108)))
    assert len(plan.bat_blocks) == 0  # stays PARTIALLY_PRESENT


def test_plan_merge_differencing_destination_promotes_a_block_whose_bits_all_get_set():
    child = layer([P], [10 * MiB], {0: bits((0, SPB // 2))})
    plan = plan_merge([child], dest([P], kind="differencing", offsets=[1 * MiB], bits={0: bits((SPB // 2, SPB))}))
    assert (plan.bat_states.tolist(), plan.bat_offsets.tolist(), len(plan.bitmap_blocks)) == ([F], [1 * MiB], 0)


def test_plan_merge_differencing_destination_keeps_uncovered_sectors_with_the_parent():
    child = layer([P], [10 * MiB], {0: bits((4, 6))})
    plan = plan_merge([child], dest([N], kind="differencing"))
    assert (plan.bat_states.tolist(), plan.bat_offsets.tolist()) == ([P], [100 * MiB])
    assert np.array_equal(np.unpackbits(plan.bitmap_bytes[0], bitorder="little"), bits((4, 6)))


def test_plan_merge_new_blocks_are_allocated_in_virtual_order():
    child = layer([F, N, F, F], [30 * MiB, 0, 20 * MiB, 10 * MiB])
    plan = plan_merge([child], dest([N, N, N, N]))
    assert plan.bat_blocks.tolist() == [0, 2, 3]
    assert plan.bat_offsets.tolist() == [100 * MiB, 101 * MiB, 102 * MiB]
    assert plan.new_blocks == 3 and plan.final_file_size == 103 * MiB


def test_plan_merge_reuses_the_space_a_zero_entry_kept_after_zero_filling_it():
    child = layer([P], [10 * MiB], {0: bits((0, 1))})
    plan = plan_merge([child], dest([Z], offsets=[5 * MiB], reusable=[True]))
    assert (plan.zero_dst.tolist(), plan.zero_len.tolist()) == ([5 * MiB], [MiB])
    assert (plan.bat_states.tolist(), plan.bat_offsets.tolist(), plan.new_blocks) == ([F], [5 * MiB], 0)


def test_plan_merge_maps_small_child_blocks_onto_a_large_destination_block():
    child = layer([N, F, N, N], [0, 10 * MiB, 0, 0])
    plan = plan_merge([child], dest([N], block=4 * MiB))
    assert plan.copy_dst.tolist() == [100 * MiB + MiB] and plan.bat_states.tolist() == [F]


def test_plan_merge_digest_follows_the_plan_content():
    a = plan_merge([layer([F], [10 * MiB])], dest([F], offsets=[1 * MiB]))
    b = plan_merge([layer([F], [11 * MiB])], dest([F], offsets=[1 * MiB]))
    assert a.digest != b.digest
    assert MergePlan.from_bytes(a.to_bytes()).digest == a.digest


# --- real merges ---------------------------------------------------------------------------------------
def merged_view(paths, model, into_index=1, **kw):
    assert read_view(paths[0]) == bytes(model)
    vhdx.merge_chain(paths[0], into=paths[into_index], verify=True, **kw)
    for p in paths[:into_index]:
        assert not p.exists()
    report = check_image(paths[into_index], chain=True)
    assert not report.errors and not report.leaks, report.codes
    return read_view(paths[into_index])


@pytest.mark.parametrize("depth", [1, 2, 3, 6])
def test_merge_into_parent_reads_the_chain_bytes(tmp_path, depth):
    paths, model = build_chain(tmp_path, child_blocks=[2 * MiB, 1 * MiB, 4 * MiB, 2 * MiB, 1 * MiB, 2 * MiB][:depth],
                               seed=depth)
    assert merged_view(paths, model) == bytes(model)


@pytest.mark.parametrize("depth", [1, 2, 4, 6])
def test_merge_into_base_reads_the_chain_bytes(tmp_path, depth):
    paths, model = build_chain(tmp_path, child_blocks=[1 * MiB, 2 * MiB, 8 * MiB, 1 * MiB, 2 * MiB, 4 * MiB][:depth],
                               seed=10 + depth)
    assert merged_view(paths, model, into_index=depth) == bytes(model)


@pytest.mark.parametrize("sector", [512, 4096])
@pytest.mark.parametrize("base_type", ["dynamic", "fixed"])
def test_merge_into_base_types_and_sector_sizes(tmp_path, sector, base_type):
    paths, model = build_chain(tmp_path, base_type=base_type, sector=sector, child_blocks=[1 * MiB, 2 * MiB],
                               seed=sector)
    assert merged_view(paths, model, into_index=2) == bytes(model)


def test_merge_into_a_differencing_ancestor_keeps_its_parent_link(tmp_path):
    paths, model = build_chain(tmp_path, child_blocks=[4 * MiB, 1 * MiB, 2 * MiB], seed=7)
    assert merged_view(paths, model, into_index=2) == bytes(model)
    with vhdx.open(paths[2]) as disk:
        assert disk.parent is not None and len(disk.layers) == 2


def test_merge_grows_the_destination_to_a_larger_child(tmp_path):
    paths, model = build_chain(tmp_path, child_blocks=[2 * MiB], seed=3, child_growth=8 * MiB)
    assert merged_view(paths, model) == bytes(model)
    with vhdx.open(paths[1]) as disk:
        assert disk.virtual_size == len(model)


def test_merge_relinks_the_children_of_the_merged_child(tmp_path):
    paths, model = build_chain(tmp_path, child_blocks=[2 * MiB, 1 * MiB], seed=5)
    grandchild, child, base = paths
    result = vhdx.merge_chain(child)
    assert result.relinked == (str(grandchild),)
    assert not child.exists() and read_view(grandchild) == bytes(model)


def test_merge_keep_renames_the_merged_files(tmp_path):
    paths, model = build_chain(tmp_path, child_blocks=[2 * MiB], seed=6)
    vhdx.merge_chain(paths[0], keep=True)
    assert not paths[0].exists() and (tmp_path / (paths[0].name + ".merged")).exists()
    assert read_view(paths[1]) == bytes(model)


def test_merge_dry_run_changes_no_byte(tmp_path):
    paths, model = build_chain(tmp_path, child_blocks=[2 * MiB], seed=8)
    before = {p: p.read_bytes() for p in paths}
    result = vhdx.merge_chain(paths[0], dry_run=True)
    assert result.dry_run and result.plan["bytes_to_copy"] > 0
    assert {p: p.read_bytes() for p in paths} == before and sorted(os.listdir(tmp_path)) == sorted(
        p.name for p in paths)


def test_merge_refuses_when_a_sibling_depends_on_the_destination(tmp_path):
    paths, model = build_chain(tmp_path, child_blocks=[2 * MiB], seed=9)
    create(tmp_path / "sibling.avhdx", parent=paths[1])
    with pytest.raises(MergeError, match="sibling.avhdx depends on the destination"):
        vhdx.merge_chain(paths[0])
    assert read_view(paths[0]) == bytes(model)


def test_merge_force_merges_and_the_sibling_then_refuses_to_open(tmp_path):
    paths, model = build_chain(tmp_path, child_blocks=[2 * MiB], seed=9)
    sibling = create(tmp_path / "sibling.avhdx", parent=paths[1])
    result = vhdx.merge_chain(paths[0], force=True)
    assert result.warnings and read_view(paths[1]) == bytes(model)
    with pytest.raises(vhdx.ParentMismatchError):
        read_view(sibling)


def test_merge_refuses_a_dirty_log(tmp_path):
    paths, _ = build_chain(tmp_path, child_blocks=[2 * MiB], seed=2)
    disk = vhdx.open(paths[0], writable=True)
    disk.write(0, b"x" * 4096)
    disk.flush()  # the log now holds an entry and the header names it; the process "dies" here
    disk.io.close()
    with pytest.raises(MergeError, match="vhdx repair"):
        vhdx.merge_chain(paths[0])


def test_merge_refuses_a_destination_that_is_not_an_ancestor(tmp_path):
    paths, _ = build_chain(tmp_path, child_blocks=[2 * MiB], seed=2)
    other = create(tmp_path / "other.vhdx", 8 * MiB)
    with pytest.raises(MergeError, match="not an ancestor"):
        vhdx.merge_chain(paths[0], into=other)


def test_merge_refuses_a_base_disk(tmp_path):
    base = create(tmp_path / "base.vhdx", 8 * MiB)
    with pytest.raises(MergeError, match="not a differencing disk"):
        vhdx.merge_chain(base)


def test_merge_refuses_when_free_space_is_short(tmp_path, monkeypatch):
    base = create(tmp_path / "base.vhdx", 16 * MiB)
    child = create(tmp_path / "child.avhdx", parent=base)
    with vhdx.open(child, writable=True) as disk:
        disk.write(0, b"\x01" * (2 * MiB))

    class Tiny:
        f_bavail, f_frsize = 1, 4096

    monkeypatch.setattr(os, "statvfs", lambda _p: Tiny)
    with pytest.raises(MergeError, match="not enough free space"):
        vhdx.merge_chain(child)


def test_merge_resume_when_nothing_was_begun_runs_the_merge(tmp_path):
    paths, model = build_chain(tmp_path, child_blocks=[2 * MiB], seed=1)
    result = vhdx.merge_chain(paths[0], resume=True)
    assert not result.resumed and not paths[0].exists() and read_view(paths[1]) == bytes(model)


# --- peers ---------------------------------------------------------------------------------------------
@pytest.fixture
def merged_base(tmp_path):
    paths, model = build_chain(tmp_path, child_blocks=[1 * MiB, 2 * MiB], seed=21)
    assert merged_view(paths, model, into_index=2) == bytes(model)
    return paths[2], model


@pytest.mark.peer
def test_merge_result_reads_the_same_with_libvhdi(merged_base):
    path, model = merged_base
    assert read_with_pyvhdi([path], len(model)) == bytes(model)


@pytest.mark.peer
def test_merge_result_reads_the_same_with_dissect(merged_base):
    path, model = merged_base
    assert read_with_dissect(path, len(model)) == bytes(model)


@pytest.mark.peer
def test_merge_result_passes_qemu_img_check_and_convert(merged_base, tmp_path):
    qemu_img = need("qemu-img")
    path, model = merged_base
    done = subprocess.run([qemu_img, "check", "-f", "vhdx", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    raw = tmp_path / "out.raw"
    subprocess.run([qemu_img, "convert", "-f", "vhdx", "-O", "raw", str(path), str(raw)], check=True)
    assert raw.read_bytes() == bytes(model)


@pytest.mark.peer
def test_merge_into_differencing_parent_libvhdi_differs_only_where_it_reads_zero_blocks_from_the_parent(tmp_path):
    # [MS-VHDX] 2.5.1.1: a ZERO/UNMAPPED payload block reads zeros; libvhdi reads it from the parent instead.
    paths, model = build_chain(tmp_path, child_blocks=[2 * MiB, 2 * MiB], seed=4, ops=10)
    assert merged_view(paths, model) == bytes(model)
    dest, base = paths[1], paths[2]
    theirs = read_with_pyvhdi([dest, base], len(model))
    expected = bytearray(model)
    with vhdx.open(dest) as disk:
        states, bs = disk.bat.states, disk.block_size
        parent = disk.parent.read(0, disk.virtual_size)
    zero_blocks = np.flatnonzero(np.isin(states, [BS.ZERO, BS.UNMAPPED, BS.UNDEFINED]))
    for b in zero_blocks.tolist():
        expected[b * bs : (b + 1) * bs] = parent[b * bs : (b + 1) * bs]
    assert theirs == bytes(expected)


@pytest.mark.peer
def test_merge_into_differencing_parent_reads_the_same_with_dissect_for_equal_block_sizes(tmp_path):
    paths, model = build_chain(tmp_path, base_block=2 * MiB, child_blocks=[2 * MiB, 2 * MiB], seed=4, ops=10)
    assert merged_view(paths, model) == bytes(model)
    theirs = read_with_dissect(paths[1], len(model))
    if theirs != bytes(model):
        # Known dissect deviation ([MS-VHDX] 2.4: a bitmap run may start at any bit; dissect drops runs that
        # start inside a byte): the difference must lie in PARTIALLY_PRESENT blocks of the destination.
        with vhdx.open(paths[1]) as disk:
            partial = set(np.flatnonzero(disk.bat.states == BS.PARTIALLY_PRESENT).tolist())
            bs = disk.block_size
        diff = np.flatnonzero(np.frombuffer(theirs, np.uint8) != np.frombuffer(bytes(model), np.uint8))
        assert set((diff // bs).tolist()) <= partial


# --- CLI -----------------------------------------------------------------------------------------------
def test_merge_cli_dry_run_json_reports_the_plan(tmp_path):
    paths, _ = build_chain(tmp_path, child_blocks=[2 * MiB], seed=11)
    result = CliRunner().invoke(cli, ["merge", str(paths[0]), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["dry_run"] and data["plan"]["bytes_to_copy"] > 0 and paths[0].exists()


def test_merge_cli_prints_the_summary(tmp_path):
    paths, model = build_chain(tmp_path, child_blocks=[2 * MiB], seed=12)
    result = CliRunner().invoke(cli, ["merge", str(paths[0]), "--verify"])
    assert result.exit_code == 0, result.output
    assert "MiB/s" in result.output and "verified" in result.output
    assert read_view(paths[1]) == bytes(model)


def test_merge_cli_error_is_one_line(tmp_path):
    base = create(tmp_path / "base.vhdx", 8 * MiB)
    result = CliRunner().invoke(cli, ["merge", str(base)])
    assert result.exit_code == 1 and "not a differencing disk" in result.output
    assert "Traceback" not in result.output


def test_flatten_cli_writes_a_standalone_disk(tmp_path):
    paths, model = build_chain(tmp_path, child_blocks=[2 * MiB, 1 * MiB], seed=13)
    out = tmp_path / "flat.vhdx"
    result = CliRunner().invoke(cli, ["flatten", str(paths[0]), str(out), "--type", "fixed"])
    assert result.exit_code == 0, result.output
    with vhdx.open(out) as disk:
        assert not disk.has_parent and disk.read(0, disk.virtual_size) == bytes(model)
