"""Every named fault of the fixture library: repair either fixes it (the chain then checks clean, reads the
manifest's bytes, and qemu-img agrees for 512-byte base disks) or refuses it with a reason."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

import vhdx
from tests.fixtures.fixture_lists import FAULT_SPECS
from vhdx.ops.check import check_image
from vhdx.ops.repair import repair_image

# The faults a repair must fix; every other fault must be refused with a reason (what it cannot do safely).
REPAIRABLE = {
    "fault-bitmap-in-dynamic",
    "fault-chain-loop",
    "fault-dirty-log",
    "fault-flipped-header-checksum",
    "fault-leaked-blocks",
    "fault-parent-moved",
    "fault-region-table-mismatch",
    "fault-reserved-bat-bits",
    "fault-stale-second-header",
    "fault-torn-log-entry",
    "fault-wrong-parent-linkage",
}


def flat_sha256(path) -> str:
    digest = hashlib.sha256()
    with vhdx.open(path) as image:
        for offset in range(0, image.virtual_size, 8 << 20):
            digest.update(image.read(offset, min(8 << 20, image.virtual_size - offset)))
    return digest.hexdigest()


PARENT_CODES = {"PARENT_NOT_FOUND", "PARENT_MISMATCH", "CHAIN_LOOP"}


def repair_chain(chain):
    """Repair every layer the chain check finds damaged, parents first; returns the refusals (layer, reason).

    Where the finding is about the parent link, the layer is relinked to the parent the spec says it has (the
    user's ``--parent``), accepting its DataWriteGuid as ``Set-VHD -IgnoreIdMismatch`` does.
    """
    top = chain.paths[chain.spec.layers[-1].name]
    report = check_image(top, chain=True)
    refusals = []
    for layer in chain.spec.layers:
        path = chain.paths[layer.name]
        codes = {f.code for f in report.all_findings if f.path and f.path == str(path)
                 and f.severity.value in ("error", "leak")}
        if not codes:
            continue
        relink = layer.parent is not None and bool(codes & PARENT_CODES)
        parent = str(chain.paths[layer.parent]) if relink else None
        result = repair_image(path, leaks=True, parent=parent, ignore_id_mismatch=relink)
        refusals += [(layer.name, r.reason) for r in result.plan.refusals]
    return refusals


@pytest.mark.parametrize("name", FAULT_SPECS)
def test_repair_fixes_or_refuses_each_fixture_fault(vhdx_chain, tmp_path, name):
    chain = vhdx_chain(name).copy_to(tmp_path / "chain")
    refusals = repair_chain(chain)
    if name not in REPAIRABLE:
        assert refusals and all(reason for _, reason in refusals), f"{name} was not refused"
        return
    assert not refusals, refusals
    top = chain.paths[chain.spec.layers[-1].name]
    report = check_image(top, chain=True)
    assert report.exit_code == 0, [(f.code, f.path, f.offset) for f in report.all_findings]
    for layer in chain.spec.layers:
        expected = chain.layer(layer.name)["flat_sha256"]
        if expected:
            assert flat_sha256(chain.paths[layer.name]) == expected, layer.name
    base = chain.paths[chain.spec.layers[0].name]
    qemu_img = shutil.which("qemu-img")
    if qemu_img and chain.layer(chain.spec.layers[0].name)["logical_sector_size"] == 512:
        check = subprocess.run([qemu_img, "check", str(base)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
