"""Allocation-aware export: ``convert -O raw`` of a disk whose allocated blocks are half zero-filled.

Every block of the disk is allocated; even blocks hold data with a 64 KiB zero run inside, odd blocks were written
with zeros (as a guest that zeroed its free space leaves them). Ours (sparse, the default) and qemu-img convert
(which skips 4 KiB zero runs by default) both leave the zeros as holes; ours ``--no-sparse`` writes every byte.
Each method fsyncs its output; the on-disk size of each output (``st_blocks``) is recorded next to the times.
"""

from __future__ import annotations

import os

import vhdx
from vhdx.ops.create import create
from vhdx.ops.export import export_raw

from . import peers
from .cases import make_limit_source
from .measure import Method, copy_file_range_all, file_digest, remove, run_methods, run_tool, warm
from .sizes import MiB, Profile, human_size
from .workloads import Payload

BLOCK = MiB  # 512-byte sectors and 1 MiB blocks: a disk qemu-img reads too
ZERO_RUN = 64 * 1024  # zero bytes inside each data block


def build(path: str, size: int) -> int:
    """The disk described above; returns its data bytes (what must be written)."""
    create(path, size, block_size=BLOCK)
    payload = Payload(41)
    data = 0
    with vhdx.open(path, writable=True) as disk:
        for offset in range(0, size, BLOCK):
            if offset // BLOCK % 2:
                disk.write(offset, bytes(BLOCK))
                continue
            chunk = bytearray(payload.chunk(offset, BLOCK))
            chunk[BLOCK // 2 : BLOCK // 2 + ZERO_RUN] = bytes(ZERO_RUN)
            disk.write(offset, bytes(chunk))
            data += BLOCK - ZERO_RUN
    return data


def on_disk(path: str) -> int:
    return os.stat(path).st_blocks * 512


def export_case(tmp: str, profile: Profile) -> dict:
    """convert -O raw: ours (sparse), ours --no-sparse, qemu-img convert, and copying the data bytes (limit)."""
    size = profile.dynamic_size
    path = os.path.join(tmp, "export-zero-filled.vhdx")
    data = build(path, size)
    limit_src = os.path.join(tmp, "export-limit-source.bin")
    make_limit_source(limit_src, data)
    warm([path, limit_src])
    out = {name: os.path.join(tmp, f"export-{name}.raw") for name in ("ours", "no-sparse", "qemu-img", "limit")}
    sizes: dict[str, int] = {}

    def measured(name: str):
        def verify() -> str:
            sizes[name] = on_disk(out[name])
            return file_digest(out[name], size)
        return verify

    def ours(sparse: bool, name: str):
        def run() -> None:
            with vhdx.open(path) as image:
                export_raw(image, out[name], overwrite=True, sync=True, sparse=sparse)
        return run

    qemu, why = peers.qemu_img()
    methods = [
        Method("ours", "ours", ours(True, "ours"), verify=measured("ours"), teardown=lambda: remove(out["ours"])),
        Method("ours --no-sparse", "ours", ours(False, "no-sparse"), verify=measured("no-sparse"),
               teardown=lambda: remove(out["no-sparse"])),
        Method("qemu-img", "peer", lambda: run_tool([qemu, "convert", "-t", "writeback", "-f", "vhdx", "-O", "raw",
                                                     path, out["qemu-img"]]),
               verify=measured("qemu-img"), teardown=lambda: remove(out["qemu-img"]), missing=why),
        Method("raw copy_file_range", "limit", lambda: copy_file_range_all(limit_src, out["limit"], data),
               teardown=lambda: remove(out["limit"])),
    ]
    outcomes = run_methods(methods, profile.repeats)
    remove(path, limit_src)
    shown = ", ".join(f"{name} {human_size(n)}" for name, n in sizes.items())
    description = (f"{human_size(size)} dynamic, 1 MiB blocks all allocated, half of them zero-filled, "
                   f"{human_size(data)} of data; output on disk: {shown}")
    return {"case": "convert -O raw (zero-filled blocks)", "workload": f"zero-filled-{human_size(size)}",
            "description": description, "bytes": data, "outcomes": outcomes, "on_disk_bytes": sizes}
