"""Executors that inject faults into a scan: a file deleted between the walk and its probe, a worker killed."""

from __future__ import annotations

import os
import signal
from concurrent.futures import Executor, Future


def kill_own_worker_once(marker: str, fn, *args):
    """Run ``fn(*args)``, except on the first call anywhere: that one SIGKILLs the process running it, mid-task.

    ``marker`` is created atomically by the first caller, so the task's retry (on a fresh worker) runs normally.
    """
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return fn(*args)
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("still alive after SIGKILL")


class KillWorkerAt(Executor):
    """Passes tasks on; the ``nth`` one kills the worker process that runs it (once)."""

    def __init__(self, inner: Executor, marker: str, nth: int = 3) -> None:
        self.inner, self.marker, self.nth, self.count = inner, marker, nth, 0

    def submit(self, fn, /, *args, **kwargs) -> Future:
        self.count += 1
        if self.count == self.nth:
            return self.inner.submit(kill_own_worker_once, self.marker, fn, *args, **kwargs)
        return self.inner.submit(fn, *args, **kwargs)


class DeleteBeforeProbe(Executor):
    """Deletes ``victim`` after the walk listed it, just before the task that probes it is submitted."""

    def __init__(self, inner: Executor, victim: str) -> None:
        self.inner, self.victim = inner, victim

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self.victim in args[0] and os.path.exists(self.victim):
            os.unlink(self.victim)
        return self.inner.submit(fn, *args, **kwargs)


def kill_own_worker_if_holding(poison: str, fn, disks, *args):
    """Run ``fn(disks, *args)`` unless ``poison`` is among the disks: then SIGKILL the worker, every time."""
    if poison in disks:
        os.kill(os.getpid(), signal.SIGKILL)
    return fn(disks, *args)


class PoisonFile(Executor):
    """Every task that holds ``poison`` kills the worker process that runs it."""

    def __init__(self, inner: Executor, poison: str) -> None:
        self.inner, self.poison = inner, poison

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return self.inner.submit(kill_own_worker_if_holding, self.poison, fn, *args, **kwargs)
