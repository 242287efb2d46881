"""Free page reporting: a virtual machine handing memory the guest freed back to its host, and pausing it.

Linux guests with a virtio balloon report free memory blocks (of ``page_reporting_order`` and up) to the host,
which drops them; the guest's next use of that memory faults it in again on the host. Measured on the machine
these benches were recorded on (2 CPUs, Linux 6.18 guest, ``page_reporting_order`` 9): copying 1 GiB into a
new file with ``copy_file_range`` took 0.33-0.39 s when it came right after freeing as much, and 2.6-3.4 s
after five idle seconds. A timed run thus pays 2-3 s per GiB of new page cache or heap when its set-up left
memory idle for a few seconds (the merge cases copy the chain first), and nothing when the method before it had
just freed that much (the raw copy came right after our merge deleted its child). That is the host's cost, not
the code's, and it falls on the methods unevenly.

``--pause-page-reporting`` (root only) raises ``page_reporting_order`` past the largest block order for the
run, so nothing is reported, and puts the former value back at the end. Without it, the report says that
reporting was active and how much memory went back to the host during the run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

PARAMETERS = "/sys/module/page_reporting/parameters"
BUDDYINFO = "/proc/buddyinfo"


def _read(name: str) -> str | None:
    try:
        with open(os.path.join(PARAMETERS, name)) as f:
            return f.read().strip()
    except OSError:
        return None


def _write(name: str, value: str) -> None:
    with open(os.path.join(PARAMETERS, name), "w") as f:
        f.write(value)


def block_orders() -> int:
    """How many block orders the page allocator has (the columns of /proc/buddyinfo; 11 on x86-64)."""
    try:
        with open(BUDDYINFO) as f:
            line = f.readline().split()
    except OSError:
        return 11
    # "Node 0, zone DMA 0 0 ...": the counts follow the zone's name
    return max(1, len(line) - 4)


@dataclass
class Reporting:
    """What the run saw: whether the guest reports free memory, from which order, and how much it reported."""

    order: int | None  # page_reporting_order during the run (None: no free page reporting here)
    paused_from: int | None = None  # the order put back after a paused run
    reported_kib: int | None = None  # memory reported to the host during the run (where the kernel counts it)

    @property
    def active(self) -> bool:
        return self.order is not None and self.order < block_orders()

    def describe(self) -> str:
        if self.order is None:
            return "no free page reporting on this machine"
        if self.paused_from is not None:
            return (f"free page reporting to the host paused for the run (page_reporting_order {self.paused_from} "
                    f"raised to {self.order}, put back after)")
        if not self.active:
            return f"free page reporting to the host reports nothing (page_reporting_order {self.order})"
        text = (f"free page reporting to the host active (page_reporting_order {self.order}): memory freed for a "
                "few seconds is faulted in again on the host when next used, which can cost a run 2-3 s per GiB")
        if self.reported_kib is not None:
            text += f"; {self.reported_kib / 1024:,.0f} MiB were reported during the run"
        return text + " (`--pause-page-reporting` pauses it, as root)"


def _order() -> int | None:
    value = _read("page_reporting_order")
    return int(value) if value is not None and value.lstrip("-").isdigit() else None


def _reported() -> int | None:
    value = _read("reported_kib")
    return int(value) if value is not None and value.isdigit() else None


@contextlib.contextmanager
def paused(pause: bool) -> Iterator[Reporting]:
    """Run the body with free page reporting paused (``pause``, needs root) or as it is; yields what was seen."""
    order = _order()
    if not pause or order is None:
        before = _reported()
        seen = Reporting(order)
        try:
            yield seen
        finally:
            after = _reported()
            if before is not None and after is not None:
                seen.reported_kib = after - before
        return
    try:
        _write("page_reporting_order", str(block_orders()))
    except OSError as exc:
        raise SystemExit(f"python -m benches: cannot pause free page reporting: {exc.strerror} (needs root)") from None
    seen = Reporting(block_orders(), paused_from=order)
    try:
        yield seen
    finally:
        _write("page_reporting_order", str(order))
