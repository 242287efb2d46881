"""Stateful property test: random writes, zeroing, trims, reopens and new checkpoints on a chain.

After every step the chain, read through the open top layer and after reopening from disk, must equal an
in-memory model of the bytes.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import vhdx
from vhdx.ops.create import create

MiB = 1 << 20
MAX_DEPTH = 4


class ChainMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="vhdx-machine-"))
        self.paths: list[Path] = []
        self.disk = None
        self.model = bytearray()
        self.top_fixed = False

    @rule(size_mib=st.integers(1, 9), extra_sectors=st.integers(0, 3), block_mib=st.sampled_from([1, 2, 4]),
          logical=st.sampled_from([512, 4096]), fixed=st.booleans())
    @precondition(lambda self: not self.paths)
    def make_base(self, size_mib, extra_sectors, block_mib, logical, fixed):
        size = size_mib * MiB + extra_sectors * logical
        path = self.folder / "base.vhdx"
        create(path, size, type="fixed" if fixed else "dynamic", block_size=block_mib * MiB,
               logical_sector_size=logical)
        self.paths.append(path)
        self.model = bytearray(size)
        self.top_fixed = fixed
        self.disk = vhdx.open(path, writable=True)

    def _range(self, data):
        size = len(self.model)
        offset = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(0, min(size - offset, 3 * MiB)))
        return offset, length

    @rule(data=st.data(), byte=st.integers(1, 255))
    @precondition(lambda self: self.paths)
    def write(self, data, byte):
        offset, length = self._range(data)
        payload = bytes([byte]) * length
        self.disk.write(offset, payload)
        self.model[offset : offset + length] = payload

    @rule(data=st.data())
    @precondition(lambda self: self.paths)
    def write_zeros(self, data):
        offset, length = self._range(data)
        self.disk.write_zeros(offset, length)
        self.model[offset : offset + length] = bytes(length)

    @rule(data=st.data())
    @precondition(lambda self: self.paths)
    def trim(self, data):
        offset, length = self._range(data)
        self.disk.discard(offset, length)
        if self.top_fixed:
            return
        bs, size = self.disk.block_size, len(self.model)
        first = -(-offset // bs)
        end = offset + length
        last = end // bs if end < size else -(-size // bs)
        for block in range(first, last):
            self.model[block * bs : min((block + 1) * bs, size)] = bytes(min(bs, size - block * bs))

    @rule()
    @precondition(lambda self: self.paths)
    def reopen(self):
        self.disk.close()
        self.disk = vhdx.open(self.paths[-1], writable=True)

    @rule(block_mib=st.sampled_from([1, 2, 4]))
    @precondition(lambda self: self.paths and len(self.paths) <= MAX_DEPTH)
    def snapshot(self, block_mib):
        self.disk.close()
        child = self.folder / f"snap{len(self.paths)}.avhdx"
        create(child, parent=self.paths[-1], block_size=block_mib * MiB)
        self.paths.append(child)
        self.top_fixed = False
        self.disk = vhdx.open(child, writable=True)

    @rule(data=st.data())
    @precondition(lambda self: self.paths)
    def small_reads(self, data):
        # Requests inside one block take the per-block short path; compare them with the model too.
        size = len(self.model)
        for _ in range(8):
            offset = data.draw(st.integers(0, size - 1))
            length = data.draw(st.integers(1, min(size - offset, 70_000)))
            assert self.disk.read(offset, length) == bytes(self.model[offset : offset + length])

    @invariant()
    def reads_equal_model(self):
        if self.disk is not None:
            assert self.disk.read(0, len(self.model)) == bytes(self.model)

    def teardown(self):
        if self.disk is not None:
            self.disk.close()
            with vhdx.open(self.paths[-1]) as disk:
                assert disk.read(0, len(self.model)) == bytes(self.model)
                assert not disk.log.is_dirty
        shutil.rmtree(self.folder, ignore_errors=True)


TestChainMachine = ChainMachine.TestCase
