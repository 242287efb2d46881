"""Results out: the JSON file, the Markdown tables and the PNG charts, plus a description of the machine."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata

from vhdx_cli.storage_bench import filesystem_of

from .sizes import TARGET_RUNS, human_size


# --- machine ------------------------------------------------------------------------------------------------
def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _qemu_version() -> str | None:
    qemu = shutil.which("qemu-img")
    if not qemu:
        return None
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else out.strip().splitlines()[0]


def machine(work_dir: str) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": human_size(round(mem / 2**30) * 2**30),
            "filesystem": filesystem_of(work_dir), "kernel": platform.release(),
            "python": platform.python_version(), "numpy": _version("numpy"), "qemu-img": _qemu_version(),
            "libvhdi-python": _version("libvhdi-python"), "dissect.hypervisor": _version("dissect.hypervisor")}


def speed() -> dict:
    """How fast this machine is right now: a pure-Python loop and a memory copy (best of 3, in ms).

    A shared machine's speed changes during the day (CPU and memory bandwidth by 2x or more). Ratios against C
    peers move with it: our fixed costs are interpreter time, theirs mostly memory and I/O. The report prints
    both numbers at the start and the end of the run, so that runs on different days can be compared.
    """
    def best(fn) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return round(min(times) * 1000, 1)

    def loop() -> None:
        total = 0
        for i in range(LOOP_STEPS):
            total += i

    source, target = bytearray(b"\x5a") * COPY_BYTES, bytearray(b"\xa5") * COPY_BYTES  # both paged in

    def copy() -> None:
        target[:] = source

    return {"python_loop_ms": best(loop), "copy_ms": best(copy)}


LOOP_STEPS = 2_000_000  # additions in the Python loop of ``speed``
COPY_BYTES = 256 << 20  # bytes copied by ``speed``


# --- JSON ---------------------------------------------------------------------------------------------------
def to_json(results: dict) -> dict:
    out = dict(results)
    out["records"] = [{**r, "outcomes": [o.to_json() for o in r["outcomes"]]} for r in results["records"]]
    return out


def write_json(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(to_json(results), f, indent=2)
        f.write("\n")


# --- Markdown -----------------------------------------------------------------------------------------------
def primary(outcomes):
    """The "ours" outcome ratios are taken against: the CLI row where there is one, else the library row."""
    for role in ("ours", "ours-lib"):
        for o in outcomes:
            if o["role"] == role and o["status"] == "ok":
                return o
    return None


def _fmt_s(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1000:.1f} ms" if t < 1 else f"{t:.2f} s"


def _rate(nbytes, t) -> str:
    return f"{nbytes / t / 2**20:,.0f} MiB/s" if nbytes and t else ""


def _cell(o, ours, nbytes) -> str:
    if o["status"] != "ok":
        return o["note"] or o["status"]
    if o is ours or o["role"] == "ours-lib":
        rate = _rate(nbytes, o["median_s"])
        return f"{_fmt_s(o['min_s'])} / {_fmt_s(o['median_s'])}" + (f" ({rate})" if rate else "")
    text = _fmt_s(o["median_s"])
    if ours is not None and o["median_s"]:
        text += f" → **{ours['median_s'] / o['median_s']:.2f}×**"
    if o.get("matches_ours") is False:
        text += " (output differs from ours)"
    return text


def _speed_line(measured: dict) -> str:
    start, end = measured.get("start", {}), measured.get("end", {})
    return (f"Machine speed at the start / end of the run: a Python loop of {LOOP_STEPS:,} additions "
            f"{start.get('python_loop_ms')} / {end.get('python_loop_ms')} ms, a {human_size(COPY_BYTES)} memory copy "
            f"{start.get('copy_ms')} / {end.get('copy_ms')} ms (lower is faster; compare runs by these first).")


def markdown(results: dict) -> str:
    data = to_json(results)
    m = data["machine"]
    runs = f"{data['repeats']} runs per method"
    if data["repeats"] > 1:  # (as sizes.target_runs gives them)
        runs += f" (at least {max(data['repeats'], TARGET_RUNS)} for the rows that carry an issue-15 target)"
    lines = [f"Profile `{data['profile']}`, {runs}, warm page cache (every input read "
             "once before timing; outputs fsynced by every method); every Python process finds its .pyc files, as an "
             "installed copy does.",
             f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, {m['filesystem']} filesystem, "
             f"Linux {m['kernel']}, Python {m['python']}, numpy {m['numpy']}; peers: qemu-img {m['qemu-img']}, "
             f"libvhdi-python {m['libvhdi-python']}, dissect.hypervisor {m['dissect.hypervisor']}.",
             *([f"Ours: {data['install']}."] if data.get("install") else []),
             *([_speed_line(data["speed"])] if data.get("speed") else []),
             *([f"Memory: {data['page_reporting']}."] if data.get("page_reporting") else []),
             "",
             "Cells: ours = min / median of the runs (throughput of the median); every other method = its median "
             "→ **ours ÷ it** (time ratio: below 1 we are faster, above 1 slower). The limit is the raw "
             "`copy_file_range` (or `pread`) of the same bytes on the same storage.", ""]
    cases: dict[str, list] = {}
    for r in data["records"]:
        cases.setdefault(r["case"], []).append(r)
    for case, recs in cases.items():
        methods = []
        for r in recs:
            for o in r["outcomes"]:
                if o["method"] not in methods:
                    methods.append(o["method"])
        lines += [f"### {case}", "", "| workload | data | " + " | ".join(methods) + " |",
                  "|---|---:|" + "---|" * len(methods)]
        for r in recs:
            ours = primary(r["outcomes"])
            by_name = {o["method"]: o for o in r["outcomes"]}
            cells = [_cell(by_name[name], ours, r["bytes"]) if name in by_name else "" for name in methods]
            size = human_size(r["bytes"]) if r["bytes"] else ""
            lines.append(f"| {r['workload']} | {size} | " + " | ".join(cells) + " |")
        rss = [(r["workload"], o["method"], o["peak_rss_kib"]) for r in recs for o in r["outcomes"]
               if o["peak_rss_kib"]]
        if rss:
            lines += ["", "Peak RSS: " + "; ".join(f"{w} {name} {k / 1024:,.0f} MiB" for w, name, k in rss) + "."]
        notes = sorted({o["note"] for r in recs for o in r["outcomes"] if o["status"] == "ok" and o["note"]})
        lines += [*(["", *[f"- {n}" for n in notes]] if notes else []), ""]
    lines += ["Workloads:", ""]
    seen = set()
    for r in data["records"]:
        if r["workload"] not in seen:
            seen.add(r["workload"])
            lines.append(f"- `{r['workload']}`: {r['description']}")
    return "\n".join(lines) + "\n"


# --- charts -------------------------------------------------------------------------------------------------
def charts(results: dict, folder: str) -> tuple[list[str], str | None]:
    """One PNG per case: each method's median time relative to ours, per workload (log scale)."""
    try:
        import matplotlib  # noqa: PLC0415 - optional (the `bench` extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return [], "charts skipped: matplotlib is not installed (pip install 'vhdx-chain[bench]')"
    data = to_json(results)
    cases: dict[str, list] = {}
    for r in data["records"]:
        cases.setdefault(r["case"], []).append(r)
    written = []
    os.makedirs(folder, exist_ok=True)
    for case, recs in cases.items():
        series: dict[str, list] = {}
        labels = [r["workload"] for r in recs]
        for i, r in enumerate(recs):
            ours = primary(r["outcomes"])
            for o in r["outcomes"]:
                if o is ours or o["status"] != "ok" or ours is None:
                    continue
                series.setdefault(o["method"], [None] * len(recs))[i] = o["median_s"] / ours["median_s"]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) + 3), 4))
        width = 0.8 / len(series)
        for k, (name, values) in enumerate(series.items()):
            xs = [i + k * width for i, v in enumerate(values) if v]
            ax.bar(xs, [v for v in values if v], width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=20, ha="right")
        ax.set_ylabel("time relative to ours (>1: ours faster)")
        ax.set_title(f"{case} ({data['profile']})")
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = os.path.join(folder, re.sub(r"[^a-z0-9]+", "-", case.lower()).strip("-") + ".png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written, None


def python_cmd() -> str:
    return " ".join([os.path.basename(sys.executable), *sys.argv])
