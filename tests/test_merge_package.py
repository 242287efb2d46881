"""The merge package's shape: a plan made window by window equals the plan made at once, copies go through
``ImageIO.copy_from`` (which test doubles override), no check hook is registered on import, small modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import vhdx
from tests.support.merge_chains import build_chain, read_view
from vhdx.format import constants as c
from vhdx.io import ImageIO
from vhdx.ops import check as check_module
from vhdx.ops.merge import DestArrays, LayerArrays, WindowPlan, plan_merge
from vhdx.ops.merge import plan as plan_module

MiB = 1 << 20
BS = c.BatState
SS = 512


def random_layers(rng: np.random.Generator, nblocks: int, kind: str):
    """A child and a middle layer over a destination, with every state and random sector bits."""
    spb = MiB // SS

    def layer(states_from):
        states = rng.choice(states_from, nblocks).astype(np.uint8)
        offsets = (np.arange(nblocks) + 8 + rng.integers(0, 4)) * MiB
        partial = np.flatnonzero(states == BS.PARTIALLY_PRESENT)
        bits = {int(b): rng.integers(0, 2, spb) for b in partial}
        return LayerArrays.build(nblocks * MiB, MiB, SS, states, offsets, bits)

    upper = [BS.NOT_PRESENT, BS.FULLY_PRESENT, BS.PARTIALLY_PRESENT, BS.ZERO]
    child, middle = layer(upper), layer(upper)
    base_states = [BS.NOT_PRESENT, BS.FULLY_PRESENT, BS.ZERO] + ([BS.PARTIALLY_PRESENT] if kind == "differencing"
                                                                 else [])
    base = layer(base_states)
    chunks = -(-nblocks // ((c.SECTORS_PER_CHUNK * SS) // MiB))
    dest = DestArrays(base, kind, rng.integers(0, 2, chunks).astype(bool) if kind == "differencing"
                      else np.zeros(chunks, bool), np.full(chunks, 4 * MiB, np.int64),
                      rng.integers(0, 2, nblocks).astype(bool), 512 * MiB, 512 * MiB)
    return [child, middle], dest


@pytest.mark.parametrize("kind", ["dynamic", "fixed", "differencing"])
@pytest.mark.parametrize("seed", range(4))
def test_plan_merge_made_in_many_windows_equals_the_plan_made_in_one(monkeypatch, kind, seed):
    layers, dest = random_layers(np.random.default_rng(seed), 37, kind)
    whole = plan_merge(layers, dest)
    monkeypatch.setattr(plan_module, "WINDOW_UNITS", 3)
    windowed = plan_merge(layers, dest)
    assert windowed.digest == whole.digest


def test_plan_window_names_what_one_window_contributes():
    layers, dest = random_layers(np.random.default_rng(7), 8, "differencing")
    shape = plan_module._shape(layers, dest, None)
    part = plan_module.plan_window(layers, dest, shape, 2, 6, next_new=0)
    assert isinstance(part, WindowPlan) and part.first_block == 2 and len(part.block_source) == 4
    assert ((part.bat_blocks >= 2) & (part.bat_blocks < 6)).all()
    assert len(part.copy_src) == len(part.copy_dst) == len(part.copy_len) == len(part.copy_layer)


def test_merge_moves_data_through_imageio_copy_from(tmp_path):
    paths, model = build_chain(tmp_path, child_blocks=[1 * MiB], seed=5, ops=8)
    calls = []

    class Recording(ImageIO):
        def copy_from(self, src, src_offset, offset, length, buf=None):
            calls.append(length)
            return super().copy_from(src, src_offset, offset, length, buf)

    result = vhdx.merge_chain(paths[0], opener=lambda path: Recording.open(path, writable=True))
    assert sum(calls) == result.plan["bytes_to_copy"] > 0
    assert read_view(paths[1]) == bytes(model)


def test_importing_the_merge_engine_registers_no_check_hook():
    import vhdx.ops.merge.run  # noqa: F401 - the import itself is what is tested

    assert not hasattr(check_module, "EXTRA_CHECKERS") and not hasattr(check_module, "register_checker")


def test_no_module_of_the_merge_package_is_over_600_lines():
    folder = Path(plan_module.__file__).parent
    sizes = {p.name: len(p.read_text().splitlines()) for p in folder.glob("*.py")}
    assert {"plan.py", "inputs.py", "apply.py", "run.py", "journal.py", "relink.py"} <= set(sizes)
    assert max(sizes.values()) <= 600, sizes
