"""Timing machinery: methods run round-robin, untimed setup/teardown, peak RSS of child processes.

Runs are warm-cache: every input file is read once before a case is timed, so all methods see the same
page-cache state; ``os.sync()`` runs (untimed) before each timed run so one run's dirty pages do not slow the
next. Every method that writes an output file fsyncs it, so each one pays for durable output alike.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import zlib

from vhdx_cli.bench_timing import (  # noqa: F401 - the benches import them from here
    Method,
    Outcome,
    ToolFailed,
    copy_file_range_all,
    remove,
    run_methods,
)

READ_CHUNK = 8 << 20


# Peak RSS of a command comes from GNU time (%M), which forks it from its own small process: the ru_maxrss
# that wait4 reports here would include this harness, because Linux keeps the high-water mark across the
# vfork+exec that subprocess uses.
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def run_tool(args: list[str], *, ok_codes=(0,), cwd: str | None = None) -> dict:
    """Run a command; returns its stdout and peak RSS in KiB (None without GNU time). Raises ToolFailed."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        prefix = [GNU_TIME, "-q", "-f", "%M", "-o", rss.name] if GNU_TIME else []
        proc = subprocess.run([*prefix, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        peak = rss.read().strip().splitlines() if GNU_TIME else []
    if proc.returncode not in ok_codes:
        lines = [line for line in stderr.strip().splitlines() if line.strip()] or [f"exit {proc.returncode}"]
        raise ToolFailed(short_error(os.path.basename(args[0]), lines[0]))
    return {"peak_rss_kib": int(peak[-1]) if peak and peak[-1].isdigit() else None, "stdout": stdout}


def short_error(tool: str, line: str) -> str:
    """``tool: message`` once, with file paths cut to their names and repeated clauses dropped."""
    text = re.sub(r"'(?:[^']*/)([^'/]+)'", r"'\1'", line.strip())
    text = text.removeprefix(f"{tool}: ")
    parts = []
    for part in text.split(": "):
        if part not in parts:
            parts.append(part)
    return f"{tool}: " + ": ".join(parts)


def warm(paths) -> None:
    """Read the data parts of each file once so that timed runs start from the same warm page cache."""
    buf = bytearray(READ_CHUNK)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
                while start < end:
                    got = os.preadv(fd, [memoryview(buf)[: min(READ_CHUNK, end - start)]], start)
                    if got <= 0:
                        break
                    start += got
                pos = end
        finally:
            os.close(fd)


def file_digest(path: str, size: int | None = None) -> str:
    """CRC-32 of a file's bytes up to ``size`` (a missing tail counts as zeros), with the length."""
    crc, done = 0, 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(READ_CHUNK)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            done += len(chunk)
    if size is not None and done < size:
        zeros = bytes(READ_CHUNK)
        while done < size:
            n = min(READ_CHUNK, size - done)
            crc = zlib.crc32(zeros[:n], crc)
            done += n
    return f"{crc:08x}/{done}"


@contextlib.contextmanager
def bytecode_cache(folder: str):
    """Child processes started inside read and write their .pyc files under ``folder``, as an installed copy has
    them (pip compiles at install); PYTHONDONTWRITEBYTECODE=1 would make every run compile vhdx's sources again."""
    saved = {name: os.environ.get(name) for name in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = folder
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def compile_sources(*modules: str) -> None:
    """Compile the packages ``modules`` into the active bytecode cache (untimed, as pip does at install)."""
    import importlib.util  # noqa: PLC0415 - only the bench's set-up needs it

    folders = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        folders += list(spec.submodule_search_locations or ()) if spec else []
    if folders:
        subprocess.run([sys.executable, "-m", "compileall", "-q", *folders], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
