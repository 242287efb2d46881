"""``merge --verify``: the chain's view before the merge against the destination's view after it, block by block,
in memory and time that follow the data held (never the virtual size)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

import vhdx
from tests.test_scale import _MEASURE, CLI, RSS_LIMIT
from vhdx.ops.create import create
from vhdx_fixtures.scale import TiB

MiB = 1 << 20
# Measured 3.6 s (2.7 s without --verify) on a quiet machine; the whole-disk verification it replaces read
# 128 TiB of zeros here: about a day.
VERIFY_64T_SECONDS = 30


def run_measured_within(args: list[str], out_path, seconds: int) -> tuple[int, int, str]:
    """``tests.test_scale.run_measured`` under coreutils ``timeout`` (exit code 124 when it ran out of time)."""
    rss_path = out_path.with_suffix(".rss")
    with open(out_path, "wb") as out:
        code = subprocess.run([sys.executable, "-c", _MEASURE, str(rss_path), "timeout", str(seconds),
                               sys.executable, "-c", CLI, *args], stdout=out, stderr=subprocess.STDOUT).returncode
    return code, int(rss_path.read_text()) * 1024, out_path.read_text()


@pytest.fixture(scope="module")
def chain64(tmp_path_factory):
    """A 64 TiB base with 1 MiB blocks and 3 MiB of data, and an empty child, made by ``create`` (sparse BATs)."""
    folder = tmp_path_factory.mktemp("vchain64")
    base, child = str(folder / "base.vhdx"), str(folder / "c1.avhdx")
    create(base, 64 * TiB, block_size=MiB)
    with vhdx.open(base, writable=True) as image:
        image.write(0, b"\xb0" * (2 * MiB))
        image.write(64 * TiB - MiB, b"\xb1" * MiB)
    create(child, parent=base)
    return base, child


@pytest.fixture
def child64(chain64, tmp_path):
    """A private copy of the 64 TiB chain (sparse copies: the BATs stay holes)."""
    base, child = (str(tmp_path / os.path.basename(p)) for p in chain64)
    for src, dst in zip(chain64, (base, child), strict=True):
        shutil.copyfile(src, dst)
    return base, child


def test_merge_verify_of_a_64t_chain_stays_under_256_mib_and_takes_seconds(child64, tmp_path):
    base, child = child64
    data = bytes(range(256)) * 4096
    with vhdx.open(child, writable=True) as image:
        image.write(MiB, data)  # over the base's data
        image.write(33 * TiB + 512, b"\x77" * 1024)  # a partially present block
        image.write(40 * TiB, bytes(MiB))  # data whose bytes are zeros
    started = time.monotonic()
    code, rss, out = run_measured_within(["merge", child, "--verify"], tmp_path / "out", VERIFY_64T_SECONDS)
    seconds = time.monotonic() - started
    assert code == 0, out
    assert rss < RSS_LIMIT
    assert seconds < VERIFY_64T_SECONDS
    assert not os.path.exists(child)
    with vhdx.open(base) as image:
        assert image.read(0, 2 * MiB) == b"\xb0" * MiB + data
        assert image.read(33 * TiB, 2048) == bytes(512) + b"\x77" * 1024 + bytes(512)
        assert image.read(64 * TiB - MiB, MiB) == b"\xb1" * MiB
