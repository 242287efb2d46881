"""``vhdx bench``: how fast merge and flatten run on your storage, next to its raw copy bandwidth."""

from __future__ import annotations

import os

import click

from vhdx_cli import render
from vhdx_cli.common import SIZE, handle_errors, json_wanted
from vhdx_cli.options import EXISTING_DIR, json_option
from vhdx_cli.storage_bench import measure_storage


@click.command()
@click.option("--dir", "folder", type=EXISTING_DIR, default=".", show_default=True,
              help="Folder on the storage to measure (a temporary sub-folder is created and removed).")
@click.option("--size", type=SIZE, default="4G", show_default=True,
              help="Virtual size of the test chain; about half of it is written (needs ~1.1x this free).")
@json_option
@handle_errors
def bench(folder, size):
    """Time flatten and merge in FOLDER against copy_file_range of the same bytes there (no peers needed)."""
    result = measure_storage(os.path.abspath(folder), size,
                             progress=None if json_wanted() else lambda message: click.echo(message, err=True))
    render.report(result.to_json(), lambda: bench_text(result))


def bench_text(result) -> str:
    lines = [f"storage: {result.folder} ({result.filesystem}), chain of {render.human_size(result.virtual_size)}, "
             f"median of {result.repeats} cold-cache runs (merge: 1 run)",
             f"{'operation':<34} {'data':>10} {'time':>9} {'MiB/s':>8}  vs raw copy"]
    for row in result.rows:
        if row.status != "ok":
            lines.append(f"{row.operation:<34} {render.human_size(row.bytes):>10}  {row.note}")
            continue
        ratio = f"{row.vs_raw_copy:.2f}x" if row.vs_raw_copy is not None else "(limit)"
        lines.append(f"{row.operation:<34} {render.human_size(row.bytes):>10} {row.seconds:>8.2f}s "
                     f"{row.mib_per_s:>8,.0f}  {ratio}")
    return "\n".join(lines)
