"""Commands that fold a chain: merge (into an ancestor, in place) and flatten (into a new standalone disk)."""

from __future__ import annotations

import os

import click

import vhdx
from vhdx_cli import render
from vhdx_cli.common import Progress, handle_errors, log_replayed_in_memory, warn_if_being_written


def _progress(label: str):
    bar = Progress(1, label)

    def report(done: int, total: int) -> None:
        bar.total = max(total, 1)
        bar(done)

    return bar, report


@click.command()
@click.argument("child", type=click.Path(dir_okay=False))
@click.option("--into", "into", type=click.Path(exists=True, dir_okay=False),
              help="Ancestor to merge into (default: CHILD's parent), like Merge-VHD -DestinationPath.")
@click.option("--dry-run", is_flag=True, help="Print the plan (blocks, bytes, new space, final size); change nothing.")
@click.option("--verify", is_flag=True, help="Compare the chain's view before with the merged view after, per block.")
@click.option("--resume", is_flag=True,
              help="Finish an interrupted merge of CHILD from its journal (none begun: merge it now).")
@click.option("--abort", is_flag=True,
              help="Give up an interrupted merge of CHILD: roll it back, or say exactly what stays changed.")
@click.option("--keep", is_flag=True, help="Rename the merged files to *.merged instead of deleting them.")
@click.option("--search-dir", "--search", "search_dirs", multiple=True,
              type=click.Path(file_okay=False, exists=True),
              help="Also look here for parents and for other disks that depend on the destination (repeatable).")
@click.option("--force", is_flag=True,
              help="Merge even though other disks depend on the destination (they will refuse to open afterwards).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.pass_context
@handle_errors
def merge(ctx, child, into, dry_run, verify, resume, abort, keep, search_dirs, force, as_json):
    """Merge the differencing disk CHILD into its parent or --into an ancestor (like Merge-VHD), crash-safely."""
    if resume and dry_run:
        raise click.UsageError("--resume takes the plan recorded by the interrupted merge (no --dry-run)")
    if abort and (resume or dry_run or into or verify or keep or force):
        raise click.UsageError("--abort takes only CHILD (and --search-dir)")
    json_out = as_json or (ctx.obj is not None and getattr(ctx.obj, "as_json", False))
    if abort:
        done = vhdx.abort_merge(child, search_dirs=search_dirs)
        if json_out:
            render.emit_json({**done.to_json(), "child_given": child})
        else:
            click.echo(abort_text(done))
        return
    bar, report = _progress("merge")
    result = vhdx.merge_chain(child, into, dry_run=dry_run, verify=verify, progress=report, keep=keep,
                        search_dirs=search_dirs, force=force, resume=resume)
    bar.finish()
    if json_out:
        render.emit_json({**result.to_json(), "child_given": child})
    else:
        click.echo(render.printable_lines(merge_text(result).split("\n")))


def abort_text(done) -> str:
    if done.rolled_back:
        return f"rolled back the merge of {done.child} into {done.destination}: every file is as before the merge"
    lines = [f"gave up the merge of {done.child} into {done.destination} (it had reached step '{done.state}'; "
             "past the point of no return, so not rolled back); what stays:"]
    lines.extend(f"  {sentence}" for sentence in done.remains)
    return "\n".join(lines)


def merge_text(result) -> str:
    plan = result.plan
    lines = []
    for warning in result.warnings:
        lines.append(f"warning: {warning}")
    head = "would merge" if result.dry_run else ("resumed merge of" if result.resumed else "merged")
    lines.append(f"{head} {' + '.join(result.merged)} into {result.destination}")
    if plan is not None:
        lines.append(f"  blocks touched: {plan['blocks_touched']} of {result.destination}")
        lines.append(f"  bytes to copy: {render.human_size(plan['bytes_to_copy'])} in {plan['copy_runs']} run(s); "
                     f"bytes to zero: {render.human_size(plan['bytes_to_zero'])}")
        lines.append(f"  new allocations: {plan['new_blocks']} block(s), {plan['new_sector_bitmaps']} sector "
                     f"bitmap(s), {plan['reused_blocks']} block(s) reusing kept space")
        if result.dry_run:
            lines.append(f"  destination file size: {render.human_size(plan['file_size'])} -> "
                         f"{render.human_size(plan['final_size_estimate'])} (estimate)")
        elif os.path.exists(result.destination):  # after the fact: what the file measures now
            lines.append(f"  destination file size: {render.human_size(plan['file_size'])} -> "
                         f"{render.human_size(os.path.getsize(result.destination))}")
        lines.append(f"  plan digest: {plan['digest']}")
    if result.relinked:
        lines.append(("  would relink: " if result.dry_run else "  relinked: ") + ", ".join(result.relinked))
    if result.dry_run:
        lines.append("dry run: nothing was changed")
        return "\n".join(lines)
    if result.removed:
        lines.append("  deleted: " + ", ".join(result.removed))
    if result.kept:
        lines.append("  kept as: " + ", ".join(result.kept))
    if result.verified:
        lines.append("  verified: the merged disk reads what the chain read, block for block")
    lines.append(f"moved {render.human_size(result.bytes_moved)} in {result.seconds:.2f} s "
                 f"({result.mib_per_second:,.1f} MiB/s)")
    return "\n".join(lines)


@click.command()
@click.argument("child", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--type", "disk_type", type=click.Choice(["dynamic", "fixed"]), default="dynamic", show_default=True,
              help="Type of the new disk.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--search", "search_dirs", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="Also look here for parents (repeatable).")
@click.option("--sync", is_flag=True, help="fsync OUT before it takes its name (default: OS write-back).")
@handle_errors
def flatten(child, out, disk_type, force, search_dirs, sync):
    """Write the whole chain seen through CHILD as a new standalone disk OUT; the chain is left untouched."""
    with vhdx.open(child, search_dirs=search_dirs) as image:
        bar = Progress(image.virtual_size, "flatten")
        written = vhdx.flatten(image, out, type=disk_type, overwrite=force, progress=bar, sync=sync)
        bar.finish()
        warn_if_being_written(image)
        replayed = log_replayed_in_memory(image)
    render.report({"child": os.path.abspath(child), "out": os.path.abspath(out), "out_given": out,
                   "data_bytes": written, "log_replayed_in_memory": replayed},
                  f"flattened {child} into {out} ({render.human_size(written)} of data)")
