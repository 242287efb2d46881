"""The scan: walk the roots, probe every disk as tasks on an executor, collect as results arrive, assemble.

A task whose worker dies is run again (Dask does that itself; a local pool is renewed and the task resubmitted);
if workers keep dying on it, each of its files is probed alone, so one file that kills its worker (a crash, the
OOM killer) costs only its own result. A task that cannot deliver turns into error results for its files: the
scan always finishes and reports every disk it found.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, CancelledError, Executor, Future, wait
from dataclasses import dataclass

from vhdx.fleet.forest import Forest, assemble
from vhdx.fleet.probe import BatchResult, DiskProbe, JournalProbe, ProbeOptions, probe_batch
from vhdx.fleet.walk import BATCH_FILES, Batch, Walker, WalkReport

RETRIES = 3  # resubmissions of a task whose local worker died (Dask's own default allows 3 too)
MAX_IN_FLIGHT = 256  # tasks submitted ahead of the results: bounds client memory on huge estates

# progress(disks probed, disks found so far, walk finished)
ProgressFn = Callable[[int, int, bool], None]


@dataclass
class ScanResult:
    roots: list[str]
    forest: Forest
    walk: WalkReport
    seconds: float
    failed_tasks: int
    options: ProbeOptions
    retried_tasks: int = 0  # submitted again after their local worker died (Dask retries out of our sight)


def _failed_batch(batch: Batch, exc: BaseException) -> BatchResult:
    reason = f"probe task failed: {type(exc).__name__}: {exc}".rstrip(": ")
    return BatchResult([DiskProbe(p, error=reason) for p in batch.disks],
                       [JournalProbe(p, error=reason) for p in batch.journals])


def _worker_lost(exc: BaseException) -> bool:
    """The task's process died (local pool broken, or Dask gave up after its own retries: KilledWorker)."""
    return isinstance(exc, BrokenExecutor) or type(exc).__name__ == "KilledWorker"


def _singles(batch: Batch) -> list[Batch]:
    return ([Batch(batch.directory, (path,), ()) for path in batch.disks]
            + [Batch(batch.directory, (), (path,)) for path in batch.journals])


def scan(roots, executor: Executor, *, options: ProbeOptions = ProbeOptions(),  # noqa: B008 - frozen default
         follow_symlinks: bool = False, batch_files: int = BATCH_FILES, max_in_flight: int = MAX_IN_FLIGHT,
         progress: ProgressFn | None = None) -> ScanResult:
    """Scan ``roots`` (folders or files) with ``executor`` and return the assembled forest."""
    began = time.monotonic()
    walker = Walker(roots, follow_symlinks=follow_symlinks, batch_files=batch_files)
    disks: list[DiskProbe] = []
    journals: list[JournalProbe] = []
    pending: dict[Future, Batch] = {}
    found, failed, walked = 0, 0, False

    def collect(done) -> None:
        nonlocal failed
        for future in done:
            batch = pending.pop(future)
            try:
                result = future.result()
            except (Exception, CancelledError) as exc:  # the task's files get the reason
                if _worker_lost(exc):
                    if isinstance(exc, BrokenExecutor) and tries.get(batch, 0) < RETRIES:
                        # A local worker died under this task: submit it again to the renewed pool.
                        tries[batch] = tries.get(batch, 0) + 1
                        submit(batch)
                        continue
                    if len(batch.disks) + len(batch.journals) > 1:
                        # Workers keep dying on this task: one file may kill them; probe each file alone.
                        for single in _singles(batch):
                            submit(single)
                        continue
                failed += 1
                result = _failed_batch(batch, exc)
            disks.extend(result.disks)
            journals.extend(result.journals)
        if progress is not None:
            progress(len(disks), found, walked)

    tries: dict[Batch, int] = {}

    def submit(batch: Batch) -> None:
        pending[executor.submit(probe_batch, list(batch.disks), list(batch.journals), options)] = batch

    try:
        for batch in walker.batches():
            found += len(batch.disks)
            submit(batch)
            if len(pending) >= max_in_flight:
                collect(wait(pending, return_when=FIRST_COMPLETED).done)
        walked = True
        while pending:
            collect(wait(pending, return_when=FIRST_COMPLETED).done)
    finally:
        for future in pending:
            future.cancel()
    forest = assemble(disks, journals)
    return ScanResult(list(walker.roots), forest, walker.report, time.monotonic() - began, failed, options,
                      sum(tries.values()))
