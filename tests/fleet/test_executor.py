from __future__ import annotations

import pytest

from vhdx.fleet.executor import InlineExecutor, dask_executor


def test_inline_executor_delivers_exceptions_through_the_future():
    future = InlineExecutor().submit(int, "x")
    with pytest.raises(ValueError):
        future.result()


def test_local_cluster_listens_on_loopback_only(dask_address):
    psutil = pytest.importorskip("psutil")
    assert dask_address.startswith("tcp://127.0.0.1:")
    me = psutil.Process()
    listening = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet") if hasattr(proc, "net_connections") else proc.connections()
        except psutil.Error:
            continue
        listening += [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN]
    assert listening and set(listening) == {"127.0.0.1"}


def test_dask_executor_runs_tasks_on_the_workers(dask_address):
    import os

    with dask_executor(dask_address) as executor:
        pids = {executor.submit(os.getpid).result() for _ in range(4)}
    assert os.getpid() not in pids
