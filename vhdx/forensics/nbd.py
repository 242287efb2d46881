"""Read-only NBD export of a virtual disk at any layer of its chain, through the real ``nbdkit`` server.

This file is two things:
- the nbdkit Python plugin (API version 2): nbdkit loads it with ``nbdkit python nbd.py file=... at=...``;
  it exports the virtual disk read-only, answers block-status queries from the extent map (holes) and the data's
  zero runs (zeros, so ``qemu-img convert`` and ``nbdcopy`` skip both), and has no write,
  trim or zero callbacks, so nbdkit refuses every write (and ``--readonly`` makes the server say so up front);
- ``nbdkit_command``, which builds that command line for ``vhdx serve`` (loopback TCP or a Unix socket).

nbdkit embeds its own Python. At module level this file imports only the standard library; the library is
imported after the ``sitedir`` keys have put the launching interpreter's packages on ``sys.path``.

References: nbdkit-python-plugin(3) (API 2 callbacks); [MS-VHDX] §2.5.1.1 (which blocks read as zeros).
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys

API_VERSION = 2
LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 10809
PLUGIN_FILE = os.path.abspath(__file__)
EXTENTS_SCAN = 64 * 2**20  # bytes of data one block-status request reads at most, to find zero runs in it
SCAN_CHUNK = 8 * 2**20  # bytes read at once while scanning

try:  # present only inside nbdkit
    import nbdkit  # type: ignore[import-not-found]
except ImportError:  # imported by the CLI or the tests
    nbdkit = None

_config: dict = {"search_dirs": [], "at": 0}


# --- plugin callbacks (run inside nbdkit) ----------------------------------------------------------------
def config(key: str, value: str) -> None:
    if key == "sitedir":
        site.addsitedir(value)
    elif key == "file":
        _config["file"] = os.path.abspath(value)
    elif key == "at":
        _config["at"] = int(value)
    elif key == "partition":
        _config["partition"] = int(value)
    elif key == "parent":
        _config["parent"] = value
    elif key == "search_dir":
        _config["search_dirs"].append(value)
    elif key in ("orphan", "ignore_id_mismatch", "salvage"):
        _config[key] = value.lower() in ("1", "true", "yes", "on")
    else:
        raise RuntimeError(f"unknown parameter {key!r}")


def config_complete() -> None:
    if "file" not in _config:
        raise RuntimeError("file=PATH is required")
    handle = open(True)  # fail now, with the library's message, rather than at the first client
    close(handle)


def thread_model():
    # One request at a time: a chain opens its parents lazily and keeps per-image state.
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


class _Export:
    def __init__(self, top, image) -> None:
        self.top = top  # the opened file: closing it closes the whole chain
        self.image = image  # the layer served


def open(readonly: bool) -> _Export:  # the callback name nbdkit looks for
    import vhdx  # noqa: PLC0415 - only importable once config() has extended sys.path

    top = vhdx.open(_config["file"], parent=_config.get("parent"), search_dirs=_config["search_dirs"],
                    ignore_id_mismatch=_config.get("ignore_id_mismatch", False), orphan=_config.get("orphan", False),
                    salvage=_config.get("salvage", False))
    try:
        layers = top.layers
        at = _config["at"]
        if not 0 <= at < len(layers):
            raise RuntimeError(f"layer {at} does not exist (the chain has {len(layers)} layers)")
        if _config.get("partition") is not None:
            from vhdx.ops.partitions import PartitionView, image_partitions, select  # noqa: PLC0415

            layer = layers[at]
            return _Export(top, PartitionView(layer, select(image_partitions(layer), _config["partition"])))
        return _Export(top, layers[at])
    except BaseException:
        top.close()
        raise


def close(h: _Export) -> None:
    h.top.close()


def get_size(h: _Export) -> int:
    return h.image.virtual_size


def can_write(h: _Export) -> bool:
    return False


def can_multi_conn(h: _Export) -> bool:
    return True


def can_extents(h: _Export) -> bool:
    return True


def pread(h: _Export, buf, offset: int, flags: int) -> None:
    h.image.readinto(offset, buf)


def extents(h: _Export, count: int, offset: int, flags: int):
    return block_status(h.image, offset, count, hole=nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO, zero=nbdkit.EXTENT_ZERO)


def block_status(image, offset: int, count: int, *, hole: int, zero: int, scan: int = EXTENTS_SCAN) -> list[tuple]:
    """NBD block status of [offset, offset + count): ``(start, length, flags)`` in order from ``offset``.

    Runs no layer supplies data for (not present, ZERO, trimmed) get ``hole``; data is read, and its whole 4 KiB
    all-zero granules get ``zero`` (allocated, reads as zeros), the rest 0. At most ``scan`` bytes of data are read
    for one request: the answer then stops early and the client asks again from there (NBD allows a shorter reply).
    """
    from vhdx.disk.extents import ExtentKind  # noqa: PLC0415
    from vhdx.disk.zero_runs import nonzero_runs  # noqa: PLC0415

    end = min(offset + count, image.virtual_size)
    found: list[list[int]] = []

    def add(start: int, length: int, flags: int) -> None:
        if found and found[-1][2] == flags and found[-1][0] + found[-1][1] == start:
            found[-1][1] += length
        else:
            found.append([start, length, flags])

    view = None
    for start, length, kind, _, _ in image.extents(offset, end).rows():
        if kind != ExtentKind.DATA:
            add(start, length, hole)
            continue
        if scan <= 0:
            break
        cut = length > scan  # the answer ends inside this run: nothing after it may follow
        length = min(length, scan)
        scan -= length
        if view is None:
            view = memoryview(bytearray(min(SCAN_CHUNK, scan + length)))
        pos = start
        while pos < start + length:
            n = min(len(view), start + length - pos)
            image.readinto(pos, view[:n])
            cursor = 0
            for run, size in nonzero_runs(view[:n], pos):
                if run > cursor:
                    add(pos + cursor, run - cursor, zero)
                add(pos + run, size, 0)
                cursor = run + size
            if cursor < n:
                add(pos + cursor, n - cursor, zero)
            pos += n
        if cut:
            break
    return [tuple(e) for e in found]


# --- launching (run by ``vhdx serve``) --------------------------------------------------------------------
def package_sitedirs() -> list[str]:
    """Folders nbdkit's Python needs on its path to import this library and its dependencies."""
    dirs = []
    for d in [*site.getsitepackages(), site.getusersitepackages(),
              os.path.dirname(os.path.dirname(os.path.dirname(PLUGIN_FILE)))]:
        if d and os.path.isdir(d) and d not in dirs:
            dirs.append(d)
    return dirs


def check_nbdkit() -> str:
    """Path of ``nbdkit`` once its Python plugin is known to match this interpreter.

    Raises:
        UnsupportedError: nbdkit or its python plugin is missing, or it embeds another Python version.
    """
    from vhdx.errors import UnsupportedError  # noqa: PLC0415 - keeps the plugin's module imports stdlib-only

    exe = shutil.which("nbdkit")
    if exe is None:
        raise UnsupportedError("nbdkit is not installed (Debian: apt-get install nbdkit nbdkit-plugin-python)")
    done = subprocess.run([exe, "python", "--dump-plugin"], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise UnsupportedError("nbdkit's python plugin is not installed (Debian: apt-get install nbdkit-plugin-python)")
    m = re.search(r"^python_version=(\d+)\.(\d+)", done.stdout, re.M)
    if m and (int(m.group(1)), int(m.group(2))) != sys.version_info[:2]:
        raise UnsupportedError(f"nbdkit's python plugin embeds Python {m.group(1)}.{m.group(2)} but vhdx runs on "
                           f"{sys.version_info[0]}.{sys.version_info[1]}; install vhdx-chain for that Python")
    return exe


def nbdkit_command(exe: str, path: str, *, at: int = 0, port: int | None = None, unix: str | None = None,
                   parent: str | None = None, search_dirs=(), ignore_id_mismatch: bool = False,
                   orphan: bool = False, salvage: bool = False, partition: int | None = None) -> list[str]:
    """The nbdkit command line: foreground, read-only, loopback TCP (default port 10809) or a Unix socket."""
    argv = [exe, "--foreground", "--readonly"]
    if unix is not None:
        argv += ["--unix", os.path.abspath(unix)]
    else:
        argv += ["--ipaddr", LOOPBACK, "--port", str(port if port is not None else DEFAULT_PORT)]
    argv += ["python", PLUGIN_FILE]
    argv += [f"sitedir={d}" for d in package_sitedirs()]
    argv += [f"file={os.path.abspath(path)}", f"at={at}"]
    if parent:
        argv.append(f"parent={os.path.abspath(parent)}")
    argv += [f"search_dir={os.path.abspath(d)}" for d in search_dirs]
    if ignore_id_mismatch:
        argv.append("ignore_id_mismatch=1")
    if orphan:
        argv.append("orphan=1")
    if salvage:
        argv.append("salvage=1")
    if partition is not None:
        argv.append(f"partition={partition}")
    return argv


def run_server(argv: list[str], unix: str | None = None) -> int:
    """Run nbdkit until it exits; SIGTERM/SIGINT/SIGHUP are passed on, and the Unix socket is removed after."""
    import signal  # noqa: PLC0415

    proc = subprocess.Popen(argv)
    previous = {}

    def forward(signum, frame) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        previous[sig] = signal.signal(sig, forward)
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        if unix is not None and os.path.exists(unix) and not os.path.isfile(unix):
            os.unlink(unix)
    # nbdkit exits 0 after a SIGTERM; a negative code means it died from a signal we did not send.
    return code if code >= 0 else 128 - code


def export_uri(port: int | None = None, unix: str | None = None) -> str:
    if unix is not None:
        return f"nbd+unix:///?socket={os.path.abspath(unix)}"
    return f"nbd://{LOOPBACK}:{port if port is not None else DEFAULT_PORT}/"
