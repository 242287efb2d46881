"""Start-up (issue 15, row 4): ``vhdx --version``, ``vhdx info small.vhdx`` and ``import vhdx`` against the floor.

The floor is ``python -c "import numpy, click"``: what any command that reads a disk must load anyway. The target
is at most 1.5x the floor for ``--version`` and ``info`` (the ratio column of the table).

Every process (ours and the floor's) runs with Python's bytecode cache on, in a folder of the case: an installed
vhdx has .pyc files (pip compiles them) as numpy and click have, while a source checkout run with
PYTHONDONTWRITEBYTECODE=1 would compile all of vhdx's sources in every run, a cost no installed copy pays.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys

import vhdx

from .cases import record
from .measure import Method, run_methods, run_tool
from .sizes import Profile

FLOOR = [sys.executable, "-c", "import numpy, click"]
STARTUP_RUNS = 3  # runs per profile repeat: a start-up is short and noisy, its minimum is what counts


def _commands(small: str) -> dict[str, list[str]]:
    vhdx_cmd = shutil.which("vhdx")
    cli = [vhdx_cmd] if vhdx_cmd else [sys.executable, "-m", "vhdx_cli.main"]
    return {"vhdx --version": [*cli, "--version"], "vhdx info small.vhdx": [*cli, "info", small],
            "import vhdx": [sys.executable, "-c", "import vhdx"]}


@contextlib.contextmanager
def bytecode_cache(folder: str):
    """Child processes started inside read and write their .pyc files under ``folder`` (as an installed copy)."""
    saved = {name: os.environ.get(name) for name in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = folder
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def startup_case(tmp: str, profile: Profile) -> list[dict]:
    """One record per command: ours (a fresh process each run) next to the import-numpy-and-click floor."""
    small = os.path.join(tmp, "startup-small.vhdx")
    vhdx.create_image(small, 16 << 20)
    records = []
    with bytecode_cache(os.path.join(tmp, "pycache")):
        run_tool(FLOOR)  # untimed: the prefix is a new tree, so numpy's and click's .pyc are written there first
        for name, args in _commands(small).items():
            run_tool(args)  # untimed: the first run writes the .pyc files (pip does it at install time)
            methods = [Method("ours", "ours", lambda args=args: run_tool(args)),
                       Method("python -c 'import numpy, click'", "limit", lambda: run_tool(FLOOR))]
            desc = (f"`{' '.join(os.path.basename(a) for a in args)}` in a new process (.pyc cached), against "
                    "importing numpy and click")
            outcomes = run_methods(methods, profile.repeats * STARTUP_RUNS)
            records.append(record("start-up", name, desc, None, outcomes))
    return records
