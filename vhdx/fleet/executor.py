"""Where probe tasks run: any ``concurrent.futures.Executor``; here in-process, a local process pool, or Dask.

The scan only calls ``submit`` and waits on the futures, so anything that offers that interface fits. A Dask
cluster is used through ``distributed.Client.get_executor``: tasks go to the workers (which must see the same
paths), results come back as they finish, and the scheduler reruns the tasks of a worker that dies. A cluster
this module starts itself listens on the loopback interface only, with every dashboard off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager

from vhdx.errors import VhdxError

LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT = 10.0  # seconds


class InlineExecutor(Executor):
    """Runs each task at once in the calling process (``--jobs 1``: no pool to start, nothing to pickle)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # delivered through the future, as a pool would
            future.set_exception(exc)
        return future


def default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LocalPool(Executor):
    """A process pool that starts afresh when a worker dies (killed, out of memory), as Dask replaces workers.

    The tasks that were running in the broken pool fail with ``BrokenExecutor``; the scan submits them again.
    """

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self._pool = ProcessPoolExecutor(max_workers=jobs)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        try:
            return self._pool.submit(fn, *args, **kwargs)
        except BrokenExecutor:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = ProcessPoolExecutor(max_workers=self.jobs)
            return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


@contextmanager
def local_executor(jobs: int | None = None) -> Iterator[Executor]:
    """``jobs`` worker processes (default: the usable cores); one job runs in this process."""
    jobs = jobs or default_jobs()
    if jobs == 1:
        yield InlineExecutor()
        return
    with LocalPool(jobs) as pool:
        yield pool


def _distributed():
    try:
        import distributed  # noqa: PLC0415 - optional dependency (the fleet extra)
    except ImportError:
        raise VhdxError("Dask is not installed (pip install 'vhdx-chain[fleet]')") from None
    return distributed


@contextmanager
def local_cluster(workers: int | None = None) -> Iterator[str]:
    """A Dask scheduler and ``workers`` single-threaded worker processes on 127.0.0.1; yields its address."""
    distributed = _distributed()
    cluster = distributed.LocalCluster(
        n_workers=workers or default_jobs(), threads_per_worker=1, processes=True, host=LOOPBACK,
        dashboard_address=None, worker_dashboard_address=None, silence_logs=logging.ERROR,
        # The scheduler keeps a small HTTP server (health routes) even without a dashboard: loopback, any port.
        scheduler_kwargs={"dashboard_address": f"{LOOPBACK}:0"})
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


@contextmanager
def dask_executor(address: str, *, timeout: float = CONNECT_TIMEOUT) -> Iterator[Executor]:
    """An executor whose tasks run on the Dask cluster at ``address`` (``tcp://HOST:PORT``)."""
    distributed = _distributed()
    try:
        client = distributed.Client(address, timeout=f"{timeout}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise VhdxError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    try:
        yield client.get_executor(pure=False)
    finally:
        client.close()
