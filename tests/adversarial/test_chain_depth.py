"""Chain depth: one documented limit (``vhdx.disk.chain.MAX_CHAIN_DEPTH``) for every reader and ``check --chain``.

A real 300-layer chain reads, maps, lists, checks and closes (no recursion limit is hit); a chain deeper than the
limit is refused with "deeper than N", never called a loop. The limit is lowered in the test to keep it fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from unittest import mock

import pytest
from click.testing import CliRunner

import vhdx
from vhdx.disk import chain
from vhdx.errors import ChainError
from vhdx.ops.check import check_image
from vhdx.ops.create import create
from vhdx_cli.main import cli

MiB = 1 << 20
LAYERS = 300


@pytest.fixture(scope="module")
def deep_chain(tmp_path_factory):
    """300 files: base.vhdx and 299 children, layer i holding byte i % 256 in sector i (paths, base first)."""
    folder = tmp_path_factory.mktemp("deep")
    paths = [folder / "base.vhdx"]
    # Durability is not under test here: skipping fsync builds the 300 files in seconds instead of half a minute.
    # Nor is create's refusal to overwrite an ancestor: it walks the whole parent chain for every new layer (a
    # quadratic build); the fresh names here are no layer's, so the walk stops at the direct parent.
    def direct_parent_only(image):
        st = os.fstat(image.io.fd)
        return [(st.st_dev, st.st_ino)]

    with mock.patch("os.fsync"), mock.patch("os.fdatasync"), \
            mock.patch("vhdx.ops.output.chain_identities", direct_parent_only):
        create(paths[0], MiB, block_size=MiB)
        with vhdx.open(paths[0], writable=True) as image:
            image.write(0, bytes([0]) * 512)
        for i in range(1, LAYERS):
            path = folder / f"layer{i:03d}.avhdx"
            create(path, parent=paths[-1])
            # force: a new layer has no children; skipping the folder scan for them keeps the build linear.
            with vhdx.open(path, writable=True, orphan=True, force=True) as image:
                image.write(i * 512, bytes([i % 256]) * 512)
            paths.append(path)
    return paths


def expected_bytes() -> bytes:
    return b"".join(bytes([i % 256]) * 512 for i in range(LAYERS))


def test_limit_is_one_documented_constant_of_at_least_1024():
    assert chain.MAX_CHAIN_DEPTH >= 1024
    assert "MAX_CHAIN_DEPTH" in (chain.__doc__ or "") + "".join(
        line for line in Path(chain.__file__).read_text().splitlines() if line.startswith("#"))


def test_300_layer_chain_reads_every_layer(deep_chain):
    with vhdx.open(deep_chain[-1]) as image:
        assert len(image.layers) == LAYERS
        assert image.read(0, LAYERS * 512) == expected_bytes()  # the general (extent) path
        assert image.read(299 * 512, 512) == bytes([299 % 256]) * 512  # the per-block path


def stack_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def test_300_layer_chain_maps_checks_and_closes_without_recursing_per_layer(deep_chain):
    old = sys.getrecursionlimit()
    # Far below the chain depth: any walk that recurses once per layer fails with RecursionError.
    sys.setrecursionlimit(stack_depth() + 150)
    try:
        with vhdx.open(deep_chain[-1]) as image:
            ext = image.extents(0, MiB)
            assert int(ext.layer.max()) == LAYERS - 1
            report = check_image(deep_chain[-1], chain=True)
    finally:
        sys.setrecursionlimit(old)
    assert report.exit_code == 0, report.all_findings[:3]
    assert len(report.parents) == LAYERS - 1


def test_300_layer_chain_cli_lists_and_checks(deep_chain):
    runner = CliRunner()
    listed = runner.invoke(cli, ["chain", str(deep_chain[-1])])
    assert listed.exit_code == 0, listed.output[-500:]
    assert f"{LAYERS - 1}: " in listed.output
    checked = runner.invoke(cli, ["check", "--chain", str(deep_chain[-1])])
    assert checked.exit_code == 0, checked.output[-500:]


@pytest.fixture
def lower_limit(monkeypatch):
    monkeypatch.setattr(chain, "MAX_CHAIN_DEPTH", 50)
    return 50


def test_reader_refuses_a_chain_deeper_than_the_limit(deep_chain, lower_limit):
    with vhdx.open(deep_chain[-1]) as image, pytest.raises(ChainError) as err:
        image.read(0, LAYERS * 512)
    assert f"deeper than {lower_limit}" in str(err.value)
    assert "loop" not in str(err.value)


@pytest.mark.parametrize("command", ["chain", "hash", "map", "convert"])
def test_cli_readers_say_deeper_than_n_not_loop(deep_chain, lower_limit, command, tmp_path):
    extra = [str(tmp_path / "out.raw"), "-O", "raw"] if command == "convert" else []
    result = CliRunner().invoke(cli, [command, str(deep_chain[-1]), *extra])
    assert result.exit_code != 0 or command == "map"  # map falls back to the layer alone, with the warning
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert f"deeper than {lower_limit}" in text, text[-500:]
    assert "loop" not in text
    assert "Traceback" not in text


def test_check_chain_reports_a_chain_deeper_than_the_limit(deep_chain, lower_limit):
    report = check_image(deep_chain[-1], chain=True)
    assert report.exit_code == 2
    assert "CHAIN_LOOP" not in report.codes()
    [finding] = report.find("CHAIN_TOO_DEEP")
    assert f"deeper than {lower_limit}" in finding.message
    assert len(report.parents) == lower_limit - 1


def test_chain_exactly_at_the_limit_is_accepted(deep_chain, monkeypatch):
    monkeypatch.setattr(chain, "MAX_CHAIN_DEPTH", 40)
    top = deep_chain[39]  # layer 39: 40 layers with the base
    with vhdx.open(top) as image:
        assert len(image.layers) == 40
    assert check_image(top, chain=True).exit_code == 0
