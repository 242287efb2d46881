"""Recorded Hyper-V answers (tests/hyperv/recordings/*.json) replayed through FakeTransport."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhdx.hyperv import FakeTransport, HyperV

RECORDINGS = Path(__file__).parent / "recordings"


@pytest.fixture
def recording():
    def path(name: str) -> str:
        return str(RECORDINGS / f"{name}.json")
    return path


@pytest.fixture
def fake(recording):
    def make(*names: str) -> FakeTransport:
        return FakeTransport.from_files(*(recording(n) for n in names))
    return make


class FakeClock:
    """Time that moves only when the backend sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def backend(fake, clock):
    def make(*names: str) -> HyperV:
        return HyperV(fake(*names), clock=clock, sleep=clock.sleep)
    return make
