"""Item 3 of issue 12: no writing command overwrites a layer of its own source chain (same inode, any path)."""

from __future__ import annotations

import hashlib
import os

import pytest
from click.testing import CliRunner

import vhdx
from vhdx_cli.main import cli

MiB = 1 << 20


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in (result.output or "")
    return result


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def chain(tmp_path):
    """base.vhdx <- mid.avhdx <- top.avhdx, each with data of its own."""
    base, mid, top = tmp_path / "base.vhdx", tmp_path / "mid.avhdx", tmp_path / "top.avhdx"
    vhdx.create_image(base, 4 * MiB, block_size=MiB)
    for i, path in enumerate((base, mid, top)):
        if i:
            vhdx.create_image(path, parent=(base, mid)[i - 1])  # after the parent's last write, which breaks children
        with vhdx.open(path, writable=True) as image:
            image.write(i * MiB, bytes([i + 1]) * 4096)
    return base, mid, top


def _hard_link(path, tmp_path):
    link = tmp_path / "other-name.img"
    os.link(path, link)
    return link


@pytest.mark.parametrize("fmt", ["raw", "vhdx"])
@pytest.mark.parametrize("layer", [0, 1])
def test_convert_refuses_to_overwrite_an_ancestor_of_its_source(chain, tmp_path, fmt, layer):
    base, mid, top = chain
    victim = (base, mid)[layer]
    before = digest(victim)
    result = run("convert", top, victim, "-O", fmt, "--force")
    assert result.exit_code == 1
    assert "layer of its chain" in result.output
    assert digest(victim) == before


@pytest.mark.parametrize("fmt", ["raw", "vhdx"])
def test_convert_refuses_a_hard_link_to_a_layer(chain, tmp_path, fmt):
    base, _mid, top = chain
    link = _hard_link(base, tmp_path)
    before = digest(base)
    result = run("convert", top, link, "-O", fmt, "--force")
    assert result.exit_code == 1 and "layer of its chain" in result.output
    assert digest(base) == before


def test_convert_refuses_a_symlink_to_a_layer(chain, tmp_path):
    base, _mid, top = chain
    link = tmp_path / "link.raw"
    link.symlink_to(base)
    before = digest(base)
    result = run("convert", top, link, "-O", "raw", "--force")
    assert result.exit_code == 1 and "layer of its chain" in result.output
    assert digest(base) == before


def test_flatten_refuses_a_hard_link_to_a_layer(chain, tmp_path):
    base, _mid, top = chain
    link = _hard_link(base, tmp_path)
    before = digest(base)
    result = run("flatten", top, link, "--force")
    assert result.exit_code == 1 and "layer of its chain" in result.output
    assert digest(base) == before


def test_create_refuses_to_replace_an_ancestor_of_the_new_child(chain, tmp_path):
    base, _mid, top = chain
    link = _hard_link(base, tmp_path)
    before = digest(base)
    result = run("create", link, "--parent", top, "--force")
    assert result.exit_code == 1 and "layer of its chain" in result.output
    assert digest(base) == before


def test_raw_import_refuses_to_overwrite_its_source(tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\x5a" * MiB)
    link = _hard_link(raw, tmp_path)
    result = run("convert", raw, link, "-O", "vhdx", "--force")
    assert result.exit_code == 1 and "layer of its chain" in result.output
    assert raw.read_bytes() == b"\x5a" * MiB
