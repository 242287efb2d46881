"""Fixtures of the scan tests: one estate of a few hundred small disks, one loopback Dask cluster."""

from __future__ import annotations

import pytest

from vhdx_fixtures.fleet import build_estate


@pytest.fixture(scope="module")
def estate(tmp_path_factory):
    return build_estate(str(tmp_path_factory.mktemp("estate") / "estate"))


@pytest.fixture(scope="session")
def dask_address():
    """A real Dask cluster (scheduler and two worker processes) on 127.0.0.1, closed at the end of the session."""
    pytest.importorskip("distributed")
    from vhdx.fleet.executor import local_cluster

    with local_cluster(2) as address:
        yield address
