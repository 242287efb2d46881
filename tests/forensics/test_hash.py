"""``hash``: the virtual disk hashes like its flattened raw image, and like pyvhdi's and dissect's reads."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import vhdx
from tests.forensics.helpers import FileGuard, MiB, build_chain, pattern
from tests.support.peers import read_with_dissect, read_with_pyvhdi
from vhdx.errors import InvalidRequestError
from vhdx.forensics.hashing import check_algorithms, hash_disk, hash_file
from vhdx_cli.main import cli


@pytest.fixture
def peer_chain(tmp_path):
    """Same block size in every layer and no ZERO/UNMAPPED block in the children (what both peers read right)."""
    return build_chain(tmp_path, [
        [("write", 0, pattern(1, 2 * MiB + 300)), ("write", 6 * MiB, pattern(2, 4096))],
        [("write", 512 * 3, pattern(3, 5000)), ("write", 3 * MiB, pattern(4, MiB + 512))],
        [("write", 7 * MiB - 1024, pattern(5, 3000))],
    ], block_sizes=[MiB, MiB, MiB])


def test_hash_equals_sha256sum_of_the_converted_raw_image(small_chain, tmp_path):
    raw = tmp_path / "flat.raw"
    result = CliRunner().invoke(cli, ["convert", "-O", "raw", str(small_chain[-1]), str(raw)])
    assert result.exit_code == 0, result.output
    tool = shutil.which("sha256sum")
    expected = (subprocess.run([tool, str(raw)], capture_output=True, text=True, check=True).stdout.split()[0]
                if tool else hashlib.sha256(raw.read_bytes()).hexdigest())
    with vhdx.open(small_chain[-1]) as image:
        assert hash_disk(image, layer_files=False).digests["sha256"] == expected


@pytest.mark.peer
def test_hash_equals_the_pyvhdi_read_of_the_chain(peer_chain):
    with vhdx.open(peer_chain[-1]) as image:
        ours = hash_disk(image, layer_files=False).digests["sha256"]
        size = image.virtual_size
    assert ours == hashlib.sha256(read_with_pyvhdi(list(reversed(peer_chain)), size)).hexdigest()


@pytest.mark.peer
def test_hash_equals_the_dissect_read_of_the_chain(peer_chain):
    with vhdx.open(peer_chain[-1]) as image:
        ours = hash_disk(image, layer_files=False).digests["sha256"]
        size = image.virtual_size
    assert ours == hashlib.sha256(read_with_dissect(peer_chain[-1], size)).hexdigest()


def test_hash_several_algorithms_and_pieces_in_one_pass(small_chain):
    with vhdx.open(small_chain[-1]) as image:
        data = image.read(0, image.virtual_size)
        result = hash_disk(image, ["sha256", "md5", "sha1"], piece_size=3 * MiB, layer_files=False)
    for algo in ("sha256", "md5", "sha1"):
        assert result.digests[algo] == hashlib.new(algo, data).hexdigest()
    assert [p["md5"] for p in result.pieces] == [hashlib.md5(data[i : i + 3 * MiB]).hexdigest()
                                                 for i in range(0, len(data), 3 * MiB)]


def test_hash_every_layer_file_as_stored(small_chain):
    with vhdx.open(small_chain[-1]) as image:
        result = hash_disk(image, ["sha1"])
    assert [layer.path for layer in result.layers] == [str(p.resolve()) for p in reversed(small_chain)]
    for layer in result.layers:
        assert layer.digests["sha1"] == hashlib.sha1(Path(layer.path).read_bytes()).hexdigest()


def test_hash_file_feeds_sparse_holes_as_zeros(tmp_path):
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(20 * MiB)
        f.seek(9 * MiB + 7)
        f.write(b"evidence")
    assert hash_file(str(path))[1]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_hash_orphan_reads_absent_as_zeros_and_lists_them(small_chain):
    with vhdx.open(small_chain[1], orphan=True) as image:
        expected = hashlib.sha256(image.read(0, image.virtual_size)).hexdigest()
        result = hash_disk(image, layer_files=False)
    assert result.orphan and result.digests["sha256"] == expected
    held = [(4096, 1024), (2 * MiB, MiB), (5 * MiB, MiB)]
    assert sum(n for _, n in result.absent) == 8 * MiB - sum(n for _, n in held)
    assert (0, 4096) in result.absent


def test_hash_rejects_unknown_algorithms():
    with pytest.raises(InvalidRequestError, match="unknown hash algorithm"):
        check_algorithms(["sha256", "crc99"])


def test_hash_cli_json_and_read_only(small_chain):
    guard = FileGuard(small_chain)
    result = CliRunner().invoke(cli, ["hash", str(small_chain[-1]), "--algo", "sha256,md5", "--piece-size", "4M",
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data["digests"]) == {"sha256", "md5"} and len(data["pieces"]) == 2 and len(data["layers"]) == 3
    guard.assert_unchanged()
