"""Start-up (issue 15, row 4): ``vhdx --version``, ``vhdx info small.vhdx`` and ``import vhdx`` against the floor.

The floor is ``python -c "import numpy, click"``: what any command that reads a disk must load anyway. The target
is at most 1.5x the floor for ``--version`` and ``info`` (the ratio column of the table).

Every process (ours and the floor's) runs with Python's bytecode cache on, in a folder of the case: an installed
vhdx has .pyc files (pip compiles them) as numpy and click have, while a source checkout run with
PYTHONDONTWRITEBYTECODE=1 would compile all of vhdx's sources in every run, a cost no installed copy pays.
Ours and the floor run under the same interpreter: the bench run's regular install (``measure.our_copy()``).
"""

from __future__ import annotations

import os

import vhdx

from .cases import record
from .measure import Method, bytecode_cache, our_copy, run_methods, run_ours  # noqa: F401 - bytecode_cache: tests
from .sizes import Profile

STARTUP_RUNS = 3  # runs per profile repeat: a start-up is short and noisy, its minimum is what counts


def floor() -> list[str]:
    """``python -c "import numpy, click"`` under the interpreter that runs ours, so the ratio compares like."""
    return [our_copy().python, "-c", "import numpy, click"]


def _commands(small: str) -> dict[str, list[str]]:
    python, vhdx_cmd = our_copy().python, our_copy().vhdx
    cli = [vhdx_cmd] if vhdx_cmd else [python, "-m", "vhdx_cli.main"]
    return {"vhdx --version": [*cli, "--version"], "vhdx info small.vhdx": [*cli, "info", small],
            "import vhdx": [python, "-c", "import vhdx"]}


def startup_case(tmp: str, profile: Profile) -> list[dict]:
    """One record per command: ours (a fresh process each run) next to the import-numpy-and-click floor."""
    small = os.path.join(tmp, "startup-small.vhdx")
    vhdx.create_image(small, 16 << 20)
    records = []
    run_ours(floor())  # untimed: numpy's and click's .pyc are written into the run's bytecode cache first
    for name, args in _commands(small).items():
        run_ours(args)  # untimed: the first run writes any .pyc still missing (pip does it at install time)
        methods = [Method("ours", "ours", lambda args=args: run_ours(args)),
                   Method("python -c 'import numpy, click'", "limit", lambda: run_ours(floor()))]
        desc = (f"`{' '.join(os.path.basename(a) for a in args)}` in a new process (.pyc cached), against "
                "importing numpy and click")
        outcomes = run_methods(methods, profile.repeats * STARTUP_RUNS)
        records.append(record("start-up", name, desc, None, outcomes))
    return records
