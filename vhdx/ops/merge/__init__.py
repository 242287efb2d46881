"""Merge engine: fold differencing disks into an ancestor, offline, crash-safe and resumable.

Rooms: ``plan`` (pure numpy planner), ``inputs`` (reading the layers' arrays), ``apply`` (carrying a plan out),
``preflight`` (safety checks), ``relink`` (parent locator changes), ``journal`` (the intent record), ``verify``
(``--verify``: the views before and after, compared) and ``run`` (locks, the journal's state machine, resume and
abort). This module only re-exports the public names, lazily (PEP 562), so that ``check`` can read a journal
without loading the engine.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "apply_merge": "apply",
    "read_dest_arrays": "inputs", "read_layer_arrays": "inputs",
    "DestArrays": "plan", "LayerArrays": "plan", "MergePlan": "plan", "WindowPlan": "plan", "plan_merge": "plan",
    "source_extents": "plan",
    "find_dependents": "preflight",
    "AbortResult": "run", "HeldFiles": "run", "MergeResult": "run", "abort_merge": "run", "find_interrupted": "run",
    "merge": "run",
    "Difference": "verify", "ViewDigests": "verify", "compare_view": "verify", "digest_view": "verify",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
