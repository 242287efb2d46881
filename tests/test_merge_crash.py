"""Crash safety of merges: interrupted at every write, flush, truncate and journal step, the chain still reads
its original bytes and ``--resume`` finishes to exactly the result of an uninterrupted merge; plus real
SIGKILLs of a ``vhdx merge`` process at random moments."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import vhdx
from tests.support.faulty_io import SimulatedCrash
from tests.support.merge_chains import build_chain, read_view
from vhdx.io import ImageIO
from vhdx.ops.check import check_image
from vhdx.ops.merge import find_interrupted
from vhdx.ops.merge import journal as merge_journal

MiB = 1 << 20


class Power:
    """One power supply for every file the merge opens: after the Nth mutating step nothing more happens."""

    def __init__(self, crash_at: int | None) -> None:
        self.crash_at = crash_at
        self.count = 0
        self.dead = False

    def step(self) -> None:
        if self.dead:
            raise SimulatedCrash("the process is gone")
        if self.crash_at is not None and self.count == self.crash_at:
            self.dead = True
            raise SimulatedCrash(f"crash at step {self.count}")
        self.count += 1


def faulty_opener(power: Power):
    class Faulty(ImageIO):
        def write_at(self, offset, data):
            power.step()
            super().write_at(offset, data)

        def flush(self):
            power.step()
            super().flush()

        def truncate(self, size):
            power.step()
            super().truncate(size)

        def copy_from(self, src, src_offset, offset, length, buf=None):
            self.copy_through_buffer(src, src_offset, offset, length, buf)  # each chunk written is a step
            return 0

    return lambda path: Faulty.open(path, writable=True)


@pytest.fixture
def journal_steps(monkeypatch):
    """Make the journal's file operations count as steps too (writes, renames, deletes)."""
    box = {"power": Power(None)}
    for name in ("atomic_write", "remove_file", "rename_file"):
        original = getattr(merge_journal, name)

        def wrapped(*args, _original=original, **kw):
            box["power"].step()
            return _original(*args, **kw)

        monkeypatch.setattr(merge_journal, name, wrapped)
    return box


def scenario(folder):
    """Grandchild -> child -> middle -> base: merge child into base (2 layers), grandchild relinked."""
    paths, model = build_chain(folder, child_blocks=[1 * MiB, 2 * MiB, 1 * MiB], seed=99, ops=8)
    return paths, model


def run_merge(paths, power, **kw):
    return vhdx.merge_chain(paths[1], into=paths[3], opener=faulty_opener(power), **kw)


def sweep(tmp_path, journal_steps, stride: int) -> None:
    pristine = tmp_path / "pristine"
    paths, model = scenario(pristine)
    child_view = read_view(paths[1])
    reference = tmp_path / "reference"
    shutil.copytree(pristine, reference)
    ref_paths = [reference / p.name for p in paths]
    power = Power(None)
    journal_steps["power"] = power
    run_merge(ref_paths, power)
    steps = power.count
    expected_base = read_view(ref_paths[3])
    assert expected_base == child_view and read_view(ref_paths[0]) == bytes(model) and steps > 20
    checked = 0
    for crash_at in range(0, steps, stride):
        work = tmp_path / f"crash{crash_at}"
        shutil.copytree(pristine, work)
        wp = [work / p.name for p in paths]
        power = Power(crash_at)
        journal_steps["power"] = power
        with pytest.raises(SimulatedCrash):
            run_merge(wp, power)
        # The chain through the top layer reads the original bytes, whatever step the crash hit.
        assert read_view(wp[0]) == bytes(model), f"crash at step {crash_at}"
        journal_steps["power"] = Power(None)
        if find_interrupted(str(wp[1])) is not None:
            result = vhdx.merge_chain(wp[1], resume=True)
            assert result.resumed
        else:  # stopped before the intent record existed: nothing had changed, so merge afresh
            vhdx.merge_chain(wp[1], into=wp[3])
        assert read_view(wp[0]) == bytes(model) and read_view(wp[3]) == expected_base, f"crash at {crash_at}"
        assert not wp[1].exists() and not wp[2].exists()
        assert not list(work.glob("*.merge-*")), f"journal left behind after crash at {crash_at}"
        checked += 1
        shutil.rmtree(work)
    assert checked == len(range(0, steps, stride))


@pytest.mark.slow
def test_merge_crash_at_every_step_then_resume_gives_the_uninterrupted_result(tmp_path, journal_steps):
    sweep(tmp_path, journal_steps, 1)


def test_merge_crash_at_every_seventh_step_then_resume_gives_the_uninterrupted_result(tmp_path, journal_steps):
    sweep(tmp_path, journal_steps, 7)


def test_merge_resume_finishes_to_the_same_destination_file(tmp_path, journal_steps):
    pristine = tmp_path / "pristine"
    paths, model = scenario(pristine)
    reference = tmp_path / "reference"
    shutil.copytree(pristine, reference)
    ref = [reference / p.name for p in paths]
    journal_steps["power"] = Power(None)
    vhdx.merge_chain(ref[1], into=ref[3])
    work = tmp_path / "work"
    shutil.copytree(pristine, work)
    wp = [work / p.name for p in paths]
    power = Power(40)
    journal_steps["power"] = power
    with pytest.raises(SimulatedCrash):
        run_merge(wp, power)
    journal_steps["power"] = Power(None)
    vhdx.merge_chain(wp[1], resume=True)
    # Same payload layout and BAT as the uninterrupted run (headers differ only in their GUIDs).
    with vhdx.open(ref[3]) as a, vhdx.open(wp[3]) as b:
        assert (a.bat.entries == b.bat.entries).all()
        assert a.read(0, a.virtual_size) == b.read(0, b.virtual_size)


def test_merge_interrupted_is_reported_by_check_chain(tmp_path, journal_steps):
    paths, model = scenario(tmp_path)
    power = Power(30)
    journal_steps["power"] = power
    with pytest.raises(SimulatedCrash):
        run_merge(paths, power)
    pending = merge_journal.journal_for_destination(str(paths[3]))
    assert pending is not None and pending.child == str(paths[1])
    journal_steps["power"] = Power(None)
    report = check_image(paths[0], chain=True)
    found = [f for f in report.all_findings if f.code == "MERGE_INTERRUPTED"]
    assert len(found) == 1 and "--resume" in found[0].message and found[0].path == str(paths[3])


MERGE_SCRIPT = """
import sys, vhdx
vhdx.merge_chain(sys.argv[1], into=sys.argv[2])
"""


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_merge_survives_sigkill_at_random_moments(tmp_path, seed):
    rng = random.Random(seed)
    pristine = tmp_path / "pristine"
    paths, model = build_chain(pristine, size=48 * MiB, child_blocks=[1 * MiB, 2 * MiB, 1 * MiB], seed=seed, ops=14)
    reference = tmp_path / "reference"
    shutil.copytree(pristine, reference)
    vhdx.merge_chain(reference / paths[1].name, into=reference / paths[3].name)
    expected = read_view(reference / paths[3].name)
    start = time.monotonic()
    probe = subprocess.run([sys.executable, "-c", MERGE_SCRIPT, str(reference / "x"), "y"], capture_output=True)
    overhead = time.monotonic() - start
    assert probe.returncode != 0
    for attempt in range(3):
        work = tmp_path / f"kill{attempt}"
        shutil.copytree(pristine, work)
        wp = [work / p.name for p in paths]
        proc = subprocess.Popen([sys.executable, "-c", MERGE_SCRIPT, str(wp[1]), str(wp[3])])
        time.sleep(overhead * rng.uniform(0.6, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if wp[1].exists() or find_interrupted(str(wp[1])) is not None:
            assert read_view(wp[0]) == bytes(model)
        if find_interrupted(str(wp[1])) is not None:
            vhdx.merge_chain(wp[1], resume=True)
        elif wp[1].exists():
            vhdx.merge_chain(wp[1], into=wp[3])  # killed before the journal existed: nothing had changed
        assert read_view(wp[0]) == bytes(model) and read_view(wp[3]) == expected
        shutil.rmtree(work)


def legacy_plan_file(plan_path) -> str:
    """Rewrite a saved plan as versions before the windowed merge wrote it: a whole-disk ``block_source``
    column where ``touched_blocks``/``touched_sources`` are now; returns the digest such a journal recorded."""
    with np.load(plan_path) as npz:
        saved = {name: npz[name] for name in npz.files}
    blocks = -(-int(saved["virtual_size"]) // int(saved["dest_block_size"]))
    source = np.full(blocks, -1, np.int16)
    source[saved["touched_blocks"]] = saved["touched_sources"]
    old = {}
    for name, value in saved.items():
        if name == "touched_blocks":
            old["block_source"] = source
        elif name != "touched_sources":
            old[name] = value
    buf = io.BytesIO()
    np.savez(buf, **old)
    with open(plan_path, "wb") as f:
        f.write(buf.getvalue())
    h = hashlib.sha256()  # the digest as the older MergePlan computed it, field by field in this order
    for name, value in old.items():
        h.update(name.encode())
        if value.ndim:
            h.update(str(value.dtype).encode() + str(value.shape).encode() + value.tobytes())
        else:
            h.update(repr(value.item()).encode())
    return h.hexdigest()


def test_merge_interrupted_under_the_older_plan_format_resumes(tmp_path, journal_steps):
    pristine = tmp_path / "pristine"
    paths, model = scenario(pristine)
    child_view = read_view(paths[1])
    for crash_at in range(5, 200):  # the first crash that leaves a planned merge with data half written
        work = tmp_path / f"crash{crash_at}"
        shutil.copytree(pristine, work)
        wp = [work / p.name for p in paths]
        journal_steps["power"] = Power(crash_at)
        with pytest.raises(SimulatedCrash):
            run_merge(wp, journal_steps["power"])
        journal = find_interrupted(str(wp[1]))
        if journal is not None and journal.state == "planned" and read_view(wp[3]) != read_view(paths[3]):
            break
        shutil.rmtree(work)
    else:
        pytest.fail("no crash point left a planned, half-written merge")
    digest = legacy_plan_file(journal.plan_path)
    with open(journal.path) as f:
        data = json.load(f)
    data["plan_digest"] = digest
    with open(journal.path, "w") as f:
        json.dump(data, f)
    journal_steps["power"] = Power(None)
    assert vhdx.merge_chain(wp[1], resume=True).resumed
    assert read_view(wp[3]) == child_view and read_view(wp[0]) == bytes(model)
