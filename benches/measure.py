"""Timing machinery: methods run round-robin, untimed setup/teardown, peak RSS of child processes.

Runs are warm-cache: every input file is read once before a case is timed, so all methods see the same
page-cache state; ``os.sync()`` runs (untimed) before each timed run so one run's dirty pages do not slow the
next. Every method that writes an output file fsyncs it, so each one pays for durable output alike.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

READ_CHUNK = 8 << 20


class ToolFailed(Exception):
    """A peer command exited with an error; the message is its first line of stderr."""


@dataclass
class Method:
    """One way of doing a case's job.

    Attributes:
        name: label in the tables ("ours", "qemu-img", "pyvhdi", ...).
        role: "ours", "peer" or "limit".
        run: the timed job. It may return a dict with ``peak_rss_kib`` and/or ``seconds`` (a time measured
            inside a child process, which then replaces the wall time around the call).
        setup: untimed, before each run.
        teardown: untimed, after each run (also after a failed one).
        verify: untimed, after the first run: a digest of what the run produced (compared with ours).
        missing: why the method cannot run here (tool not installed, function not built yet); never run then.
    """

    name: str
    role: str
    run: Callable[[], dict | None] | None = None
    setup: Callable[[], None] | None = None
    teardown: Callable[[], None] | None = None
    verify: Callable[[], str] | None = None
    missing: str | None = None


@dataclass
class Outcome:
    method: str
    role: str
    status: str = "ok"  # ok | missing | failed
    note: str = ""
    times: list[float] = field(default_factory=list)
    peak_rss_kib: int | None = None
    digest: str | None = None
    matches_ours: bool | None = None

    @property
    def min(self) -> float | None:
        return min(self.times) if self.times else None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    def to_json(self) -> dict:
        return {"method": self.method, "role": self.role, "status": self.status, "note": self.note,
                "times_s": [round(t, 6) for t in self.times], "min_s": self.min, "median_s": self.median,
                "peak_rss_kib": self.peak_rss_kib, "matches_ours": self.matches_ours}


def run_methods(methods: list[Method], repeats: int) -> list[Outcome]:
    """Time each available method ``repeats`` times, interleaved round by round so drift hits all alike."""
    outcomes = [Outcome(m.name, m.role) for m in methods]
    for m, o in zip(methods, outcomes, strict=False):
        if m.missing:
            o.status, o.note = "missing", m.missing
    for round_index in range(repeats):
        for m, o in zip(methods, outcomes, strict=False):
            if o.status != "ok":
                continue
            try:
                if m.setup:
                    m.setup()
                os.sync()
                t0 = time.perf_counter()
                extra = m.run()
                extra = extra if isinstance(extra, dict) else {}
                elapsed = time.perf_counter() - t0
                o.times.append(extra.get("seconds", elapsed))
                if extra.get("peak_rss_kib") is not None:
                    o.peak_rss_kib = max(o.peak_rss_kib or 0, int(extra["peak_rss_kib"]))
                if round_index == 0 and m.verify:
                    o.digest = m.verify()
            except Exception as exc:  # noqa: BLE001 - a peer failing is a result to report, not a crash
                o.status, o.note = "failed", _first_line(exc)
                o.times.clear()
            finally:
                if m.teardown:
                    m.teardown()
    ours = next((o for o in outcomes if o.role == "ours" and o.digest), None)
    if ours is not None:
        for o in outcomes:
            if o.digest is not None and o is not ours:
                o.matches_ours = o.digest == ours.digest
    return outcomes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and not isinstance(exc, ToolFailed) else (
        text[0] if text else type(exc).__name__)


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


def copy_file_range_all(src: str, dst: str, length: int) -> None:
    """The limit: copy ``length`` bytes of ``src`` into a new ``dst`` with ``os.copy_file_range``, then fsync."""
    fd_in = os.open(src, os.O_RDONLY)
    fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < length:
            n = os.copy_file_range(fd_in, fd_out, length - done, done, done)
            if n == 0:
                raise OSError(f"{src} ends before {length} bytes")
            done += n
        os.fsync(fd_out)
    finally:
        os.close(fd_in)
        os.close(fd_out)


def remove(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
