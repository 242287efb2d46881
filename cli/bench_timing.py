"""Timing core shared by ``vhdx bench`` and the repository's ``benches/``: methods timed round-robin.

Each method's setup and teardown run untimed; ``os.sync()`` runs (untimed) before each timed run so one run's
dirty pages do not slow the next. Lives in the CLI package because ``vhdx bench`` ships in the wheel and
``benches/`` does not.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


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
        missing: why the method cannot run here (e.g. a peer tool not installed); never run then.
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
            except Exception as exc:  # a peer failing is a result to report, not a crash
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
