"""Commands that fold a chain: merge (into an ancestor, in place) and flatten (into a new standalone disk)."""

from __future__ import annotations

import click

import vhdx
from vhdx_cli import render
from vhdx_cli.common import Progress, handle_errors
from vhdx_cli.options import EXISTING_FILE, NEW_FILE, chain_options, force_option, json_option, reading


def _progress(label: str):
    bar = Progress(1, label)

    def report(done: int, total: int) -> None:
        bar.total = max(total, 1)
        bar(done)

    return bar, report


@click.command()
@click.argument("child", type=NEW_FILE)
@click.option("--into", "into", type=EXISTING_FILE,
              help="Ancestor to merge into (default: CHILD's parent), like Merge-VHD -DestinationPath.")
@click.option("--dry-run", is_flag=True, help="Print the plan (blocks, bytes, new space, final size); change nothing.")
@click.option("--verify", is_flag=True, help="Compare the chain's view before with the merged view after, per block.")
@click.option("--resume", is_flag=True,
              help="Finish an interrupted merge of CHILD from its journal (none begun: merge it now).")
@click.option("--abort", is_flag=True,
              help="Give up an interrupted merge of CHILD: roll it back, or say exactly what stays changed.")
@click.option("--keep", is_flag=True, help="Rename the merged files to *.merged instead of deleting them.")
@chain_options(only=("search_dirs",),
               search_help="Also look here for parents and for other disks that depend on the destination "
                           "(repeatable).")
@force_option("Merge even though other disks depend on the destination (they will refuse to open afterwards).")
@json_option
@handle_errors
def merge(child, into, dry_run, verify, resume, abort, keep, search_dirs, force):
    """Merge the differencing disk CHILD into its parent or --into an ancestor (like Merge-VHD), crash-safely."""
    if resume and dry_run:
        raise click.UsageError("--resume takes the plan recorded by the interrupted merge (no --dry-run)")
    if abort and (resume or dry_run or into or verify or keep or force):
        raise click.UsageError("--abort takes only CHILD (and --search-dir)")
    if abort:
        render.merge_aborted(vhdx.abort_merge(child, search_dirs=search_dirs), child)
        return
    bar, report = _progress("merge")
    result = vhdx.merge_chain(child, into, dry_run=dry_run, verify=verify, progress=report, keep=keep,
                        search_dirs=search_dirs, force=force, resume=resume)
    bar.finish()
    render.merged(result, child)


@click.command()
@click.argument("child", type=EXISTING_FILE)
@click.argument("out", type=NEW_FILE)
@click.option("--type", "disk_type", type=click.Choice(["dynamic", "fixed"]), default="dynamic", show_default=True,
              help="Type of the new disk.")
@force_option("Overwrite OUT if it exists.")
@click.option("--sync", is_flag=True, help="fsync OUT before it takes its name (default: OS write-back).")
@chain_options
@json_option
@handle_errors
def flatten(child, out, disk_type, force, sync, **chain_opts):
    """Write the whole chain seen through CHILD as a new standalone disk OUT; the chain is left untouched."""
    with reading(child, chain_opts) as opened:
        bar = Progress(opened.image.virtual_size, "flatten")
        written = vhdx.flatten(opened.image, out, type=disk_type, overwrite=force, progress=bar, sync=sync)
        bar.finish()
    render.flattened(child, out, written, opened.replayed)
