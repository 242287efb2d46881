"""The read-only commands (info, chain, map, convert) on real images, through click's CliRunner."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.test_corpus import CHILD_OVER_PARENT
from tests.test_corpus import EXPECTED as CORPUS_SHA256
from vhdx_cli.main import cli

# The corpus hashes live in one table (tests/test_corpus.py, from MANIFEST.md); here the small images, and two
# large ones whose conversion is slow.
EXPECTED = {name: CORPUS_SHA256[name] for name in (
    "dfvfs/fat-parent.vhdx.gz", "dfvfs/ntfs-fixed.vhdx.gz", "dfvfs/ntfs-dynamic.vhdx.gz", "dfvfs/ext2.vhdx.gz",
    "dissect.hypervisor/fixed.vhdx.gz", "dissect.hypervisor/dynamic.vhdx.gz", "coreos-hyperv/config2_base.vhdx.bz2",
    "qemu-iotests/test-disk2vhd.vhdx.bz2")}
SLOW_EXPECTED = {name: CORPUS_SHA256[name] for name in (
    "qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2", "discutils/btrfs.vhdx.gz")}
DIRTY_LOG = "qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2"
AVHDX = "dissect.hypervisor/differencing.avhdx.gz"
ALL_IMAGES = sorted(EXPECTED) + [DIRTY_LOG, AVHDX]


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture()
def windows_pair(corpus_image, tmp_path) -> Path:
    for name in ("fat-parent.vhdx", "fat-differential.vhdx"):
        shutil.copyfile(corpus_image(f"dfvfs/{name}.gz"), tmp_path / name)
    return tmp_path / "fat-differential.vhdx"


# --- info -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_IMAGES)
def test_cli_info_json_parses(corpus_image, name):
    result = invoke("info", "--json", corpus_image(name))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == "vhdx"
    assert data["virtual_size"] > 0
    assert sum(data["bat"]["state_counts"].values()) == data["bat"]["payload_blocks"]


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_cli_info_text_exits_zero(corpus_image, name):
    result = invoke("info", corpus_image(name))
    assert result.exit_code == 0, result.output
    assert "virtual size:" in result.stdout


def test_cli_info_shows_parent_locator_of_avhdx(corpus_image):
    data = json.loads(invoke("info", "--json", corpus_image(AVHDX)).stdout)
    assert data["disk_type"] == "differencing"
    assert data["parent_locator"]["entries"]["relative_path"].endswith(
        "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx")


def test_cli_info_dirty_log_reported(corpus_image):
    data = json.loads(invoke("info", "--json", corpus_image(DIRTY_LOG)).stdout)
    assert data["log"]["dirty"] is True
    assert data["log"]["entries_to_replay"] == 1


# --- chain ------------------------------------------------------------------------------------------

def test_cli_chain_json_lists_child_then_parent(windows_pair):
    result = invoke("chain", "--json", windows_pair)
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    assert [Path(layer["path"]).name for layer in layers] == ["fat-differential.vhdx", "fat-parent.vhdx"]
    assert [layer["disk_type"] for layer in layers] == ["differencing", "fixed"]
    assert layers[1]["linkage_ok"] is True
    assert layers[1]["found_by"] == "relative_path"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cli_chain_base_disk_has_one_layer(corpus_image, name):
    result = invoke("chain", "--json", corpus_image(name))
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["layers"]) == 1


def test_cli_chain_missing_parent_exits_one_and_names_paths(corpus_image):
    result = invoke("chain", corpus_image(AVHDX))
    assert result.exit_code == 1
    assert "differencing" in result.stdout
    assert "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx" in result.output


# --- map --------------------------------------------------------------------------------------------

def assert_covers_exactly_once(rows: list[dict], virtual_size: int) -> None:
    position = 0
    for row in rows:
        assert row["start"] == position, row
        assert row["length"] > 0
        position += row["length"]
    assert position == virtual_size


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_cli_map_json_covers_disk_exactly_once(corpus_image, name):
    path = corpus_image(name)
    size = json.loads(invoke("info", "--json", path).stdout)["virtual_size"]
    result = invoke("map", "--json", path)
    assert result.exit_code == 0, result.output
    assert_covers_exactly_once(json.loads(result.stdout)["extents"], size)


def test_cli_map_json_chain_names_both_layers(windows_pair):
    rows = json.loads(invoke("map", "--json", windows_pair).stdout)["extents"]
    assert_covers_exactly_once(rows, 4 << 20)
    assert {Path(r["file"]).name for r in rows if r["state"] == "data"} == {"fat-differential.vhdx",
                                                                            "fat-parent.vhdx"}


def test_cli_map_avhdx_missing_parent_full_output_and_warning(corpus_image):
    path = corpus_image(AVHDX)
    result = invoke("map", "--json", path)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["extents"]
    assert_covers_exactly_once(rows, 8 << 30)
    assert {"data", "parent-missing"} <= {r["state"] for r in rows}
    warning = result.stderr.strip().splitlines()
    assert len(warning) == 1 and "warning" in warning[0]
    assert "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx" in warning[0]


def test_cli_map_text_has_header_and_rows(corpus_image):
    result = invoke("map", corpus_image("coreos-hyperv/config2_base.vhdx.bz2"))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Offset")
    assert len(lines) >= 2


# --- convert ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cli_convert_raw_matches_manifest_sha256(corpus_image, tmp_path, name):
    out = tmp_path / "disk.raw"
    result = invoke("convert", corpus_image(name), out, "-O", "raw")
    assert result.exit_code == 0, result.output
    assert sha256_file(out) == EXPECTED[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_EXPECTED))
def test_cli_convert_raw_matches_manifest_sha256_large(corpus_image, tmp_path, name):
    out = tmp_path / "disk.raw"
    result = invoke("convert", corpus_image(name), out, "-O", "raw")
    assert result.exit_code == 0, result.output
    assert sha256_file(out) == SLOW_EXPECTED[name]


def test_cli_convert_chain_matches_manifest_sha256(windows_pair, tmp_path):
    out = tmp_path / "flat.raw"
    result = invoke("convert", windows_pair, out, "-O", "raw")
    assert result.exit_code == 0, result.output
    assert sha256_file(out) == CHILD_OVER_PARENT


def test_cli_convert_output_is_sparse(corpus_image, tmp_path):
    out = tmp_path / "disk.raw"
    assert invoke("convert", corpus_image(DIRTY_LOG), out, "-O", "raw").exit_code == 0
    assert out.stat().st_size == 10 << 30
    assert out.stat().st_blocks * 512 < 64 << 20


def test_cli_convert_refuses_to_overwrite_without_force(corpus_image, tmp_path):
    out = tmp_path / "disk.raw"
    out.write_bytes(b"keep me")
    result = invoke("convert", corpus_image("dfvfs/ext2.vhdx.gz"), out, "-O", "raw")
    assert result.exit_code in (1, 2)
    assert len(result.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"keep me"


def test_cli_convert_overwrites_with_force(corpus_image, tmp_path):
    out = tmp_path / "disk.raw"
    out.write_bytes(b"replace me")
    result = invoke("convert", corpus_image("dfvfs/ext2.vhdx.gz"), out, "-O", "raw", "--force")
    assert result.exit_code == 0, result.output
    assert sha256_file(out) == EXPECTED["dfvfs/ext2.vhdx.gz"]


def test_cli_convert_avhdx_missing_parent_one_line_error(corpus_image, tmp_path):
    out = tmp_path / "disk.raw"
    result = invoke("convert", corpus_image(AVHDX), out, "-O", "raw")
    assert result.exit_code in (1, 2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "parent not found" in lines[0]
    assert not out.exists()
    assert not Path(str(out) + ".part").exists()


# --- read-only commands do not touch their input ----------------------------------------------------

@pytest.mark.parametrize("name", ["dfvfs/ext2.vhdx.gz", DIRTY_LOG, AVHDX, "dissect.hypervisor/fixed.vhdx.gz"])
@pytest.mark.parametrize("command", ["info", "chain", "map", "convert"])
def test_cli_read_commands_leave_source_unchanged(corpus_image, tmp_path, name, command):
    source = tmp_path / "source.vhdx"
    shutil.copyfile(corpus_image(name), source)
    old = os.stat(source).st_mtime_ns - 10_000_000_000  # well in the past, so a rewrite would show
    os.utime(source, ns=(old, old))
    digest = sha256_file(source)
    args = [command, source] + ([tmp_path / "out.raw", "-O", "raw"] if command == "convert" else [])
    invoke(*args)  # the AVHDX fails for chain/convert: the source must stay untouched all the same
    assert os.stat(source).st_mtime_ns == old
    assert sha256_file(source) == digest


def test_cli_read_commands_leave_chain_unchanged(windows_pair, tmp_path):
    parent = windows_pair.parent / "fat-parent.vhdx"
    before = {p: (sha256_file(p), os.stat(p).st_mtime_ns) for p in (windows_pair, parent)}
    for args in (["info", windows_pair], ["chain", windows_pair], ["map", windows_pair],
                 ["convert", windows_pair, tmp_path / "o.raw", "-O", "raw"]):
        assert invoke(*args).exit_code == 0
    assert {p: (sha256_file(p), os.stat(p).st_mtime_ns) for p in (windows_pair, parent)} == before
