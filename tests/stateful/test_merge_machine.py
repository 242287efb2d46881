"""Stateful property test: random writes, zeroing, trims and checkpoints on a chain, with merges of any layer
into any of its ancestors in between; the chain through its top layer must always read the model's bytes.

After every merge the chain must check clean (no corruption, no leaked space); once everything is merged into
the base disk, libvhdi, dissect.hypervisor and (512-byte sectors) qemu-img must read the model's bytes too.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import vhdx
from tests.support.merge_chains import read_view
from tests.support.peers import read_with_dissect, read_with_pyvhdi
from vhdx.ops.check import check_image
from vhdx.ops.create import create

MiB = 1 << 20
MAX_DEPTH = 6
# Blocks from the smallest to the largest the format allows; disks stay small (a 256 MiB block is sparse).
BLOCK_MIB = st.sampled_from([1, 2, 4, 32, 256])


class MergeMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="vhdx-merge-machine-"))
        self.paths: list[Path] = []  # child first
        self.model = bytearray()
        self.fixed = False
        self.made = 0

    def teardown(self):
        shutil.rmtree(self.folder, ignore_errors=True)

    @rule(size_mib=st.integers(2, 8), block_mib=BLOCK_MIB, logical=st.sampled_from([512, 4096]), fixed=st.booleans())
    @precondition(lambda self: not self.paths)
    def make_base(self, size_mib, block_mib, logical, fixed):
        path = self.folder / "base.vhdx"
        create(path, size_mib * MiB, type="fixed" if fixed else "dynamic", block_size=block_mib * MiB,
               logical_sector_size=logical)
        self.paths = [path]
        self.model = bytearray(size_mib * MiB)
        self.fixed = fixed
        self.logical = logical

    def _range(self, data, lss):
        size = len(self.model)
        offset = data.draw(st.integers(0, size // lss - 1)) * lss
        length = data.draw(st.integers(1, (size - offset) // lss)) * lss
        return offset, min(length, 3 * MiB)

    @rule(data=st.data(), byte=st.integers(1, 255))
    @precondition(lambda self: self.paths)
    def write_block(self, data, byte):
        size = len(self.model)
        offset = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(1, min(size - offset, 3 * MiB)))
        with vhdx.open(self.paths[0], writable=True) as disk:
            disk.write(offset, bytes([byte]) * length)
        self.model[offset : offset + length] = bytes([byte]) * length

    @rule(data=st.data())
    @precondition(lambda self: self.paths)
    def zero(self, data):
        with vhdx.open(self.paths[0], writable=True) as disk:
            offset, length = self._range(data, disk.logical_sector_size)
            disk.write_zeros(offset, length)
        self.model[offset : offset + length] = bytes(length)

    @rule(data=st.data())
    @precondition(lambda self: self.paths)
    def trim(self, data):
        with vhdx.open(self.paths[0], writable=True) as disk:
            offset, length = self._range(data, disk.logical_sector_size)
            disk.discard(offset, length)
            bs, size = disk.block_size, len(self.model)
            if self.fixed and not disk.has_parent:
                return
        first, end = -(-offset // bs), offset + length
        last = end // bs if end < size else -(-size // bs)
        for b in range(first, max(first, last)):
            self.model[b * bs : min(size, (b + 1) * bs)] = bytes(min(size, (b + 1) * bs) - b * bs)

    @rule(block_mib=BLOCK_MIB)
    @precondition(lambda self: self.paths and len(self.paths) < MAX_DEPTH)
    def snapshot(self, block_mib):
        self.made += 1
        path = self.folder / f"snap{self.made}.avhdx"
        create(path, parent=self.paths[0], block_size=block_mib * MiB)
        self.paths.insert(0, path)

    @rule(data=st.data())
    @precondition(lambda self: len(self.paths) >= 2)
    def merge(self, data):
        src = data.draw(st.integers(0, len(self.paths) - 2))
        dst = data.draw(st.integers(src + 1, len(self.paths) - 1))
        vhdx.merge_chain(self.paths[src], into=self.paths[dst])
        del self.paths[src:dst]
        report = check_image(self.paths[0], chain=True)
        assert report.exit_code == 0, [(f.code, f.path, f.offset, f.message) for f in report.all_findings]
        if len(self.paths) == 1:
            self._peers_read_the_base()

    def _peers_read_the_base(self):
        base, model = self.paths[0], bytes(self.model)
        assert read_with_pyvhdi([base], len(model)) == model
        assert read_with_dissect(base, len(model)) == model
        qemu_img = shutil.which("qemu-img")
        if qemu_img and self.logical == 512:  # qemu 7.2 opens only 512-byte-sector VHDX
            check = subprocess.run([qemu_img, "check", str(base)], capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr
            raw = self.folder / "base.raw"
            subprocess.run([qemu_img, "convert", "-O", "raw", str(base), str(raw)], check=True)
            assert raw.read_bytes() == model
            raw.unlink()

    @rule()
    @precondition(lambda self: self.paths)
    def reopen(self):
        with vhdx.open(self.paths[0], writable=True):
            pass

    @invariant()
    def reads_the_model(self):
        if self.paths:
            assert read_view(self.paths[0]) == bytes(self.model)


MergeMachine.TestCase.settings = settings(settings(), stateful_step_count=12)
TestMergeMachine = MergeMachine.TestCase
