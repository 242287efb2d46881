"""The benchmark cases. Each returns records: one case on one workload, every method timed in the same run.

A record is ``{"case", "workload", "description", "bytes", "outcomes": [Outcome, ...]}``; ``bytes`` is the
amount of data the job moves (for throughput columns), or None.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import shutil
import subprocess
import zlib

import vhdx
from vhdx.ops.create import create
from vhdx.ops.export import export_raw
from vhdx_cli.storage_bench import drop_cache

from . import peers
from .measure import Method, copy_file_range_all, file_digest, our_copy, remove, run_methods, run_ours, run_tool, warm
from .sizes import MiB, Profile, human_size
from .workloads import Payload, Workload

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "merge_probe.py")


def record(case: str, w_name: str, description: str, nbytes: int | None, outcomes) -> dict:
    return {"case": case, "workload": w_name, "description": description, "bytes": nbytes, "outcomes": outcomes}


def make_limit_source(path: str, length: int) -> None:
    """A plain file of ``length`` data bytes on the same storage: what the raw-copy limit copies."""
    payload = Payload(99)
    with open(path, "wb") as f:
        for offset in range(0, length, 8 * MiB):
            f.write(payload.chunk(offset, min(8 * MiB, length - offset)))
        f.flush()
        os.fsync(f.fileno())


# --- flatten ------------------------------------------------------------------------------------------------
def flatten(w: Workload, tmp: str, profile: Profile, limit_src: str) -> dict:
    """Flatten the chain to a raw file: ours, qemu-img convert, pyvhdi and dissect read loops, raw copy."""
    warm(w.layers)
    out = {name: os.path.join(tmp, f"flat-{name}.raw") for name in ("ours", "qemu-img", "pyvhdi", "dissect", "limit")}

    def ours():
        with vhdx.open(w.path) as image:
            export_raw(image, out["ours"], overwrite=True, sync=True)  # every method here ends with an fsync

    methods = [Method("ours", "ours", ours, verify=lambda: file_digest(out["ours"], w.virtual_size),
                      teardown=lambda: remove(out["ours"]))]
    qemu, why = peers.qemu_img()
    if w.depth:
        why = "n/a: qemu-img 7.2 cannot open differencing VHDX"
    methods.append(Method("qemu-img", "peer",
                          lambda: run_tool([qemu, "convert", "-t", "writeback", "-f", "vhdx", "-O", "raw", w.path,
                                            out["qemu-img"]]),
                          verify=lambda: file_digest(out["qemu-img"], w.virtual_size),
                          teardown=lambda: remove(out["qemu-img"]), missing=why))
    for name, (cls, available) in peers.READERS.items():
        def run(cls=cls, name=name):
            disk = cls(w.layers)
            try:
                peers.read_loop_to_raw(disk, out[name])
            finally:
                disk.close()

        methods.append(Method(name, "peer", run, verify=lambda name=name: file_digest(out[name], w.virtual_size),
                              teardown=lambda name=name: remove(out[name]), missing=available()[1]))
    methods.append(Method("raw copy_file_range", "limit",
                          lambda: copy_file_range_all(limit_src, out["limit"], w.data_bytes),
                          teardown=lambda: remove(out["limit"])))
    return record("flatten to raw", w.name, w.description, w.data_bytes, run_methods(methods, profile.repeats))


# --- reads --------------------------------------------------------------------------------------------------
def read_requests(w: Workload, profile: Profile, pattern: str) -> tuple[list[tuple[int, int]], str]:
    """The (offset, length) requests of a read pattern and the case's name."""
    if pattern == "random":
        rng = random.Random(11)
        requests = [(rng.randrange(w.virtual_size // 4096) * 4096, 4096) for _ in range(profile.random_reads)]
        return requests, "random 4 KiB reads"
    span = min(profile.sequential_read_bytes, w.virtual_size)
    return [(offset, MiB) for offset in range(0, span, MiB)], "sequential 1 MiB reads"


def open_peer(name: str, cls, available, layers, opened: dict) -> str:
    """Open a peer reader into ``opened[name]``; what is missing or failed ("" when it opened)."""
    missing = available()[1]
    if not missing:
        try:
            opened[name] = cls(layers)
        except Exception as exc:  # reported as the peer's failure
            missing = f"failed to open: {type(exc).__name__}: {exc}"
    return missing


def reads(w: Workload, tmp: str, profile: Profile, pattern: str) -> dict:
    """Random 4 KiB or sequential 1 MiB reads through the chain: ours, pyvhdi, dissect; pread of a raw copy."""
    requests, case = read_requests(w, profile, pattern)
    raw = os.path.join(tmp, "reads-flat.raw")
    with vhdx.open(w.path) as image:
        export_raw(image, raw, overwrite=True)
    warm([*w.layers, raw])
    buf = bytearray(max(n for _, n in requests))
    view = memoryview(buf)
    opened: dict = {}

    def ours_open():
        opened["ours"] = vhdx.open(w.path)

    def ours_loop(crc=None):
        image = opened["ours"]
        for offset, n in requests:
            image.readinto(offset, view[:n])
            if crc is not None:
                crc[0] = zlib.crc32(view[:n], crc[0])

    def raw_loop(crc=None):
        fd = opened["raw"]
        for offset, n in requests:
            os.preadv(fd, [view[:n]], offset)
            if crc is not None:
                crc[0] = zlib.crc32(view[:n], crc[0])

    def lib_loop(name, crc=None):
        disk = opened[name]
        for offset, n in requests:
            data = disk.read(offset, n)
            if crc is not None:
                crc[0] = zlib.crc32(data, crc[0])

    def digest(loop, *args):
        crc = [0]
        loop(*args, crc=crc)
        return f"{crc[0]:08x}"

    try:
        ours_open()
        opened["raw"] = os.open(raw, os.O_RDONLY)
        methods = [Method("ours", "ours", ours_loop, verify=lambda: digest(ours_loop))]
        for name, (cls, available) in peers.READERS.items():
            missing = open_peer(name, cls, available, w.layers, opened)
            methods.append(Method(name, "peer", lambda name=name: lib_loop(name),
                                  verify=lambda name=name: digest(lib_loop, name), missing=missing))
        methods.append(Method("pread of raw file", "limit", raw_loop, verify=lambda: digest(raw_loop)))
        outcomes = run_methods(methods, profile.repeats)
    finally:
        for key, value in opened.items():
            os.close(value) if key == "raw" else value.close()
        remove(raw)
    total = sum(n for _, n in requests)
    return record(case, w.name, f"{w.description}; {len(requests)} requests", total, outcomes)


# --- merge --------------------------------------------------------------------------------------------------
def copy_sparse(src: str, dst: str) -> None:
    subprocess.run(["cp", "--sparse=always", "--reflink=never", src, dst], check=True)


def merge(w: Workload, tmp: str, profile: Profile, limit_src: str) -> dict:
    """Merge the top child into its parent (in a fresh copy of the chain each run) vs copying the same bytes."""
    work = os.path.join(tmp, "merge")
    copies = [os.path.join(work, os.path.basename(p)) for p in w.layers]
    limit_out = os.path.join(tmp, "merge-limit.raw")
    with vhdx.open(w.path) as image:
        expected_raw = os.path.join(tmp, "merge-expected.raw")
        export_raw(image, expected_raw, overwrite=True)
    expected = file_digest(expected_raw, w.virtual_size)
    remove(expected_raw)

    def setup():
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        for src, dst in zip(w.layers, copies, strict=False):
            copy_sparse(src, dst)
        warm(copies)

    def ours():
        done = run_ours([our_copy().python, PROBE, copies[-1]])
        probe = json.loads(done["stdout"].strip().splitlines()[-1])
        return {"seconds": probe["seconds"], "peak_rss_kib": probe.get("vmhwm_kib") or done["peak_rss_kib"]}

    def verify():
        # After the merge the parent alone must read what the whole chain read before.
        flat = os.path.join(work, "merged.raw")
        with vhdx.open(copies[-2]) as image:
            export_raw(image, flat, overwrite=True)
        return file_digest(flat, w.virtual_size)

    methods = [Method("ours", "ours", ours, setup=setup, verify=verify,
                      teardown=lambda: shutil.rmtree(work, ignore_errors=True)),
               Method("raw copy_file_range", "limit", lambda: copy_file_range_all(limit_src, limit_out,
                                                                                   w.top_data_bytes),
                      teardown=lambda: remove(limit_out))]
    outcomes = run_methods(methods, profile.repeats)
    if outcomes[0].digest is not None:
        outcomes[0].matches_ours = None
        if outcomes[0].digest != expected:
            outcomes[0].status, outcomes[0].note = "failed", "merged parent does not read the chain's bytes"
        else:
            outcomes[0].note = "result verified: parent reads the chain's bytes; RSS = whole probe process"
    desc = f"{w.description}; the child ({human_size(w.top_data_bytes)} of data) merged into its parent"
    return record("merge child into parent", w.name, desc, w.top_data_bytes, outcomes)


# --- info / check -------------------------------------------------------------------------------------------
def qemu_equivalent(w: Workload, tmp: str) -> tuple[str | None, str | None]:
    """The sparse disk made by qemu-img and written by qemu-io at the same offsets; (path, None) or (None, why)."""
    qemu, why = peers.qemu_img()
    qio, why_io = peers.qemu_io()
    if not qemu or not qio:
        return None, why or why_io
    path = os.path.join(tmp, "sparse-qemu.vhdx")
    run_tool([qemu, "create", "-q", "-f", "vhdx", "-o", "subformat=dynamic,block_size=1M", path,
              str(w.virtual_size)])
    args = [qio, "-f", "vhdx"]
    for i, offset in enumerate(w.extra.get("offsets", [])):
        args += ["-c", f"write -P {0x11 + i & 0xFF} {offset} 1M"]
    run_tool([*args, path])
    return path, None


def cli_has(command: str) -> str | None:
    """None when ``vhdx COMMAND`` exists, else why not."""
    import click  # noqa: PLC0415

    from vhdx_cli.main import cli  # noqa: PLC0415 - only to see which commands are registered

    # Commands load lazily: ask the group, not its dict of already imported commands.
    known = cli.list_commands(click.Context(cli))
    return None if command in known else f"missing: vhdx {command} (not registered)"


def check_function():
    return vhdx.check_image


def _call_check(fn, path: str):
    params = list(inspect.signature(fn).parameters)
    if params and params[0] == "image":
        with vhdx.open(path) as image:
            return fn(image)
    return fn(path)


def info_check(w: Workload, tmp: str, profile: Profile) -> list[dict]:
    """``info`` and ``check`` of the sparse disk: ours (library and CLI) vs qemu-img on ours and on its own."""
    from vhdx.ops.inspect import describe_image  # noqa: PLC0415

    vhdx_cmd = our_copy().vhdx
    qemu, qemu_missing = peers.qemu_img()
    qemu_image, qemu_image_missing = qemu_equivalent(w, tmp)
    warm([w.path] + ([qemu_image] if qemu_image else []))

    def lib_info():
        with vhdx.open(w.path, orphan=True) as image:
            describe_image(image)

    info_methods = [
        Method("ours (library)", "ours-lib", lib_info),
        Method("ours (vhdx info --json)", "ours", lambda: run_ours([vhdx_cmd, "info", "--json", w.path]),
               missing=None if vhdx_cmd else "missing: vhdx not on PATH"),
        Method("qemu-img info (same file)", "peer", lambda: run_tool([qemu, "info", w.path]), missing=qemu_missing),
        Method("qemu-img info (qemu-made file)", "peer", lambda: run_tool([qemu, "info", qemu_image]),
               missing=qemu_image_missing),
    ]
    check_fn = check_function()
    check_methods = [
        Method("ours (library)", "ours-lib", lambda: _call_check(check_fn, w.path)),
        Method("ours (vhdx check)", "ours", lambda: run_ours([vhdx_cmd, "check", w.path], ok_codes=(0, 2, 3)),
               missing=cli_has("check")),
        Method("qemu-img check (same file)", "peer", lambda: run_tool([qemu, "check", w.path], ok_codes=(0, 2, 3)),
               missing=qemu_missing),
        Method("qemu-img check (qemu-made file)", "peer",
               lambda: run_tool([qemu, "check", qemu_image], ok_codes=(0, 2, 3)), missing=qemu_image_missing),
    ]
    try:
        return [record("info", w.name, w.description, None, run_methods(info_methods, profile.repeats)),
                record("check", w.name, w.description, None, run_methods(check_methods, profile.repeats))]
    finally:
        if qemu_image:
            remove(qemu_image)


# --- create -------------------------------------------------------------------------------------------------
def create_case(tmp: str, profile: Profile, disk_type: str) -> dict:
    """Create an empty fixed or dynamic disk: ours (library, CLI) vs ``qemu-img create``."""
    path = os.path.join(tmp, f"create-{disk_type}.vhdx")
    size = profile.create_size
    vhdx_cmd = our_copy().vhdx
    qemu, qemu_missing = peers.qemu_img()
    cleanup = lambda: remove(path)  # noqa: E731
    methods = [
        Method("ours (library)", "ours-lib", lambda: create(path, size, type=disk_type), teardown=cleanup),
        Method("ours (vhdx create)", "ours",
               lambda: run_ours([vhdx_cmd, "create", "-s", str(size), "-t", disk_type, path]), teardown=cleanup,
               missing=None if vhdx_cmd else "missing: vhdx not on PATH"),
        Method("qemu-img create", "peer",
               lambda: run_tool([qemu, "create", "-q", "-f", "vhdx", "-o", f"subformat={disk_type}", path,
                                 str(size)]), teardown=cleanup, missing=qemu_missing),
    ]
    desc = f"{disk_type} {size >> 20} MiB, 32 MiB blocks"
    return record(f"create {disk_type}", disk_type, desc, None, run_methods(methods, profile.repeats))


# --- scan ---------------------------------------------------------------------------------------------------
def read_first_mib(paths: list[str]) -> None:
    """The floor of any per-disk probe: open each file and read its first MiB."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.pread(fd, MiB, 0)
        finally:
            os.close(fd)


def scan_case(tmp: str, profile: Profile) -> list[dict]:
    """Probe a fleet of small disks against the floor of opening each file and reading its first MiB.

    Warm page cache: ``--jobs 1``, ``--jobs 2`` and a local Dask cluster (2 workers, started before timing).
    Cold (each file's pages dropped before every run, as on a share nothing has read yet): ``--jobs 1`` and
    the floor.
    """
    from vhdx.fleet.executor import dask_executor, local_cluster, local_executor  # noqa: PLC0415
    from vhdx.fleet.probe import probe_disk  # noqa: PLC0415
    from vhdx.fleet.scan import scan  # noqa: PLC0415
    from vhdx_fixtures.fleet import build_fleet  # noqa: PLC0415

    folder = os.path.join(tmp, "fleet")
    paths = build_fleet(folder, profile.scan_disks)
    warm(paths)

    def ours(run_scan):
        def run():
            result = run_scan()
            assert len(result.forest.nodes) == len(paths) and not result.forest.unreadable

        return run

    def local(jobs):
        def run_scan():
            with local_executor(jobs) as executor:
                return scan([folder], executor)

        return ours(run_scan)

    def probe_only():
        # The quantity issue 16 bounds: the header-only probe of each disk (no walk, forest or output).
        for path in paths:
            assert probe_disk(path).error is None

    floor = Method("limit: open + read 1 MiB each", "limit", lambda: read_first_mib(paths))
    methods = [Method("ours (--jobs 1)", "ours", local(1)), Method("ours (--jobs 2)", "ours-lib", local(2)),
               Method("ours (probe only, in-process)", "ours-lib", probe_only)]
    with contextlib.ExitStack() as stack:
        try:
            executor = stack.enter_context(dask_executor(stack.enter_context(local_cluster(2))))
        except Exception as exc:  # no Dask here: say so in the table
            methods.append(Method("ours (local Dask, 2 workers)", "ours-lib",
                                  missing=f"missing: {str(exc).splitlines()[0]}"))
        else:
            methods.append(Method("ours (local Dask, 2 workers)", "ours-lib", ours(lambda: scan([folder], executor))))
        warm_outcomes = run_methods([*methods, floor], profile.repeats)
    cold = [Method("ours (--jobs 1)", "ours", local(1), setup=lambda: drop_cache(paths)),
            Method(floor.name, "limit", floor.run, setup=lambda: drop_cache(paths))]
    cold_outcomes = run_methods(cold, profile.repeats)
    shutil.rmtree(folder, ignore_errors=True)
    desc = f"{len(paths):,} disks of 4 MiB virtual, chains of 5 in folders of 50, header-only probe"
    return [record("scan (probe every disk)", f"fleet-{len(paths)} warm", desc, None, warm_outcomes),
            record("scan (probe every disk)", f"fleet-{len(paths)} cold", desc + "; page cache dropped per run",
                   None, cold_outcomes)]
