"""Child process of the merge case: merge one child into its parent, print seconds and peak memory as JSON.

Run as a script (``python merge_probe.py CHILD``) so that the parent's peak RSS (from wait4) and VmHWM here
measure the merge alone, not the benchmark harness.
"""

from __future__ import annotations

import inspect
import json
import resource
import sys
import time


def vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def main(child: str) -> int:
    import vhdx

    fn = getattr(vhdx, "merge", None)
    if fn is not None and inspect.ismodule(fn):
        fn = getattr(fn, "merge", None)
    if not callable(fn):
        print("vhdx.ops.merge is not built yet", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    fn(child)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "vmhwm_kib": vm_hwm_kib(),
                      "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
