"""64 TiB cases (issue 15.1): sparse create, info of a qemu-made disk, chain and map of a 4-layer chain.

Targets: create <= 0.1x ``qemu-img create`` (file < 16 MiB on disk); info <= 0.5x ``qemu-img info`` at <= 1/4 of
its RSS; chain and map each <= 3x ``qemu-img info`` of one layer and <= 256 MiB RSS. Always 64 TiB whatever
the profile: the size is the point of these cases.
"""

from __future__ import annotations

import os
import shutil

from vhdx_fixtures.scale import build_scale_chain

from . import peers
from .measure import Method, our_copy, remove, run_methods, run_ours, run_tool, warm
from .sizes import MiB, target_runs

SIZE_ARG = "64T"


def _on_disk_mib(path: str) -> float:
    return round(os.stat(path).st_blocks * 512 / MiB, 1)


def _record(case: str, workload: str, description: str, outcomes) -> dict:
    return {"case": case, "workload": workload, "description": description, "bytes": None, "outcomes": outcomes}


def create_64t(tmp: str, repeats: int) -> dict:
    """``vhdx create --size 64T --block-size 1M`` vs ``qemu-img create -o block_size=1M,subformat=dynamic``."""
    vhdx_cmd = our_copy().vhdx
    qemu, qemu_missing = peers.qemu_img()
    mine, theirs = os.path.join(tmp, "create64-ours.vhdx"), os.path.join(tmp, "create64-qemu.vhdx")
    methods = [
        Method("ours (vhdx create)", "ours", lambda: run_ours([vhdx_cmd, "create", "--size", SIZE_ARG,
                                                              "--block-size", "1M", mine]),
               setup=lambda: remove(mine), missing=None if vhdx_cmd else "missing: vhdx not on PATH"),
        Method("qemu-img create", "peer", lambda: run_tool([qemu, "create", "-q", "-f", "vhdx", "-o",
                                                            "block_size=1M,subformat=dynamic", theirs, SIZE_ARG]),
               setup=lambda: remove(theirs), missing=qemu_missing),
    ]
    outcomes = run_methods(methods, repeats)
    sizes = ", ".join(f"{name} {_on_disk_mib(p)} MiB" for name, p in (("ours", mine), ("qemu-img", theirs))
                      if os.path.exists(p))
    remove(mine, theirs)
    return _record("create 64 TiB", "empty-64t", f"dynamic 64 TiB, 1 MiB blocks; on disk: {sizes}", outcomes)


def scale_cases(tmp: str, profile) -> list[dict]:
    """Every 64 TiB row: create, info of the qemu-made base, chain and map of the 4-layer chain."""
    runs = target_runs(profile)
    records = [create_64t(tmp, runs)]
    vhdx_cmd = our_copy().vhdx
    qemu, qemu_missing = peers.qemu_img()
    if qemu_missing:
        return records
    folder = os.path.join(tmp, "scale-chain")
    os.makedirs(folder, exist_ok=True)
    chain = build_scale_chain(folder)
    base = chain.layers[-1]
    try:
        warm(list(chain.layers))
        missing = None if vhdx_cmd else "missing: vhdx not on PATH"
        qemu_info = Method("qemu-img info (one layer, the base)", "peer", lambda: run_tool([qemu, "info", base]))
        info = [Method("ours (vhdx info)", "ours", lambda: run_ours([vhdx_cmd, "info", base]), missing=missing),
                qemu_info]
        records.append(_record("info 64 TiB", "qemu-64t", "qemu-made 64 TiB disk, 1 MiB blocks (BAT of ZERO entries)",
                               run_methods(info, runs)))
        for command in ("chain", "map"):
            methods = [Method(f"ours (vhdx {command})", "ours", lambda c=command: run_ours([vhdx_cmd, c, chain.top]),
                              missing=missing), qemu_info]
            records.append(_record(f"{command} 64 TiB chain", "chain-64t-4",
                                   "4 layers of 64 TiB: qemu-made base, 3 children with scattered blocks",
                                   run_methods(methods, runs)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return records
