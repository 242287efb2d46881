"""Child process of the merge case: merge one child into its parent, print seconds and peak memory as JSON.

Run as a script (``python merge_probe.py CHILD``) so that the parent's peak RSS (from wait4) and VmHWM here
measure the merge alone, not the benchmark harness.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import vhdx


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
    t0 = time.perf_counter()
    vhdx.merge_chain(child)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "vmhwm_kib": vm_hwm_kib(),
                      "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
