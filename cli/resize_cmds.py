"""Commands that change a disk's layout in place: resize (Resize-VHD) and compact (Optimize-VHD)."""

from __future__ import annotations

import os

import click

from vhdx.ops.compact import MODES, compact_image
from vhdx.ops.resize import resize_image
from vhdx_cli import render
from vhdx_cli.common import SIZE, Progress, handle_errors


def _size(n: int | None) -> str:
    return "?" if n is None else render.human_size(n)


@click.command()
@click.argument("disk", type=click.Path(exists=True, dir_okay=False))
@click.option("-s", "--size", type=SIZE, help="New virtual size (K/M/G/T suffixes), a multiple of the sector size.")
@click.option("--force", is_flag=True,
              help="Cut data past a smaller size; resize a disk that has children (they will no longer open).")
@click.option("--to-minimum", is_flag=True,
              help="Shrink to the end of the last partition (MBR/GPT; the GPT backup copy moves to the new end).")
@click.option("--dry-run", is_flag=True, help="Say what would happen and change nothing.")
@click.option("--resume", is_flag=True, help="Finish an interrupted resize (its size comes from the record).")
@click.option("--search-dir", "search_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Also look for children of DISK in this folder (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.pass_context
@handle_errors
def resize(ctx, disk, size, to_minimum, force, dry_run, resume, search_dirs, as_json):
    """Grow or shrink the virtual disk of DISK in place (like Resize-VHD), crash-safe."""
    if sum([size is not None, to_minimum, resume]) != 1:
        raise click.UsageError("give one of --size, --to-minimum, or --resume to finish an interrupted resize")
    as_json = as_json or (ctx.obj is not None and ctx.obj.as_json)
    if not as_json and not resume:
        target = "the end of its last partition" if to_minimum else f"{size} bytes"
        click.echo(f"{'would resize' if dry_run else 'resizing'} {disk} to {target}")
    progress = Progress(os.path.getsize(disk), "resize: bytes moved")
    result = resize_image(disk, size, force=force, dry_run=dry_run, resume=resume, to_minimum=to_minimum,
                          search_dirs=search_dirs, progress=progress)
    progress.finish()
    if as_json:
        render.emit_json({**render.with_absolute_path(result.to_json(), disk), "dry_run": dry_run})
        return
    for warning in result.warnings:
        click.echo(f"vhdx: warning: {warning}", err=True)
    verb = "would change" if dry_run else "changed"
    click.echo(f"{verb} virtual size {result.old_size} -> {result.new_size} bytes")
    if not dry_run:
        click.echo(f"file size {_size(result.file_size_before)} -> {_size(result.file_size_after)}; "
                   f"{result.blocks_moved} blocks moved" + ("; BAT moved to the end of the file"
                                                            if result.bat_relocated else "")
                   + ("; GPT backup copy moved to the new end" if result.gpt_backup_moved else ""))


@click.command()
@click.argument("disk", type=click.Path(exists=True, dir_okay=False))
@click.option("--mode", type=click.Choice(MODES), default="full", show_default=True,
              help="full: zero and trimmed blocks; prezeroed: zero blocks; pretrimmed: trimmed blocks; quick: as full, "
                   "plus blocks holding only free clusters of the guest's NTFS/FAT file systems.")
@click.option("--dry-run", is_flag=True, help="Say what would be released and change nothing.")
@click.option("--force", is_flag=True, help="Compact a disk other disks depend on (their data stays valid).")
@click.option("--resume", is_flag=True, help="Finish an interrupted compaction.")
@click.option("--parent", type=click.Path(dir_okay=False), help="Parent of a differencing DISK (not its locator's).")
@click.option("--search-dir", "search_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Also look for parents by file name in this folder (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.pass_context
@handle_errors
def compact(ctx, disk, mode, dry_run, force, resume, parent, search_dirs, as_json):
    """Release blocks of DISK that read as zeros and shrink the file (like Optimize-VHD, offline), crash-safe."""
    as_json = as_json or (ctx.obj is not None and ctx.obj.as_json)
    if not as_json:
        click.echo(f"{'would compact' if dry_run else 'compacting'} {disk} ({'resumed' if resume else mode})")
    progress = Progress(os.path.getsize(disk), "compact: bytes scanned, then moved")
    result = compact_image(disk, mode, dry_run=dry_run, force=force, resume=resume, parent=parent,
                           search_dirs=search_dirs, progress=progress)
    progress.finish()
    if as_json:
        render.emit_json(render.with_absolute_path(result.to_json(), disk))
        return
    for warning in result.warnings:
        click.echo(f"vhdx: warning: {warning}", err=True)
    bs = result.block_size
    verb = "would release" if dry_run else "released"
    if result.mode == "quick":
        click.echo("guest: " + "\n  ".join(result.guest))
        click.echo(f"{verb} {result.free_blocks_released} blocks holding only free guest clusters "
                   f"({_size(result.free_blocks_released * bs)})")
    click.echo(f"{verb} {result.zero_blocks_released} zero blocks and the space of {result.trimmed_blocks_released} "
               f"trimmed blocks ({_size((result.zero_blocks_released + result.trimmed_blocks_released) * bs)})")
    if result.kept_over_parent_data or result.kept_partial:
        click.echo(f"kept {result.kept_over_parent_data} zero blocks that hide parent data and "
                   f"{result.kept_partial} partially present blocks (not reclaimable in a chain)")
    if not dry_run:
        click.echo(f"file size {_size(result.file_size_before)} -> {_size(result.file_size_after)} "
                   f"({_size(result.bytes_released)} released); {result.blocks_moved} blocks moved")
