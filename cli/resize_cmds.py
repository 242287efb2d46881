"""Commands that change a disk's layout in place: resize (Resize-VHD) and compact (Optimize-VHD)."""

from __future__ import annotations

import os

import click

from vhdx.ops.compact import MODES, compact_image
from vhdx.ops.resize import resize_image
from vhdx_cli import render
from vhdx_cli.common import SIZE, Progress, handle_errors
from vhdx_cli.options import (
    EXISTING_FILE,
    chain_options,
    dependents_options,
    force_option,
    in_place_options,
    json_option,
)


@click.command()
@click.argument("disk", type=EXISTING_FILE)
@click.option("-s", "--size", type=SIZE, help="New virtual size (K/M/G/T suffixes), a multiple of the sector size.")
@click.option("--to-minimum", is_flag=True,
              help="Shrink to the end of the last partition (MBR/GPT; the GPT backup copy moves to the new end).")
@in_place_options("resize (its size comes from the record)")
@dependents_options("DISK", force_help="Cut data past a smaller size; resize a disk that has children (they will "
                                       "no longer open).")
@json_option
@handle_errors
def resize(disk, size, to_minimum, force, dry_run, resume, search_dirs):
    """Grow or shrink the virtual disk of DISK in place (like Resize-VHD), crash-safe."""
    if sum([size is not None, to_minimum, resume]) != 1:
        raise click.UsageError("give one of --size, --to-minimum, or --resume to finish an interrupted resize")
    if not resume:
        render.resize_starting(disk, size, to_minimum, dry_run)
    progress = Progress(os.path.getsize(disk), "resize: bytes moved")
    result = resize_image(disk, size, force=force, dry_run=dry_run, resume=resume, to_minimum=to_minimum,
                          search_dirs=search_dirs, progress=progress)
    progress.finish()
    render.resized(result, disk, dry_run)


@click.command()
@click.argument("disk", type=EXISTING_FILE)
@click.option("--mode", type=click.Choice(MODES), default="full", show_default=True,
              help="full: zero and trimmed blocks; prezeroed: zero blocks; pretrimmed: trimmed blocks; quick: as full, "
                   "plus blocks holding only free clusters of the guest's NTFS/FAT file systems.")
@in_place_options("compaction")
@force_option("Compact a disk other disks depend on (their data stays valid).")
@chain_options(only=("parent", "search_dirs"))
@json_option
@handle_errors
def compact(disk, mode, dry_run, force, resume, parent, search_dirs):
    """Release blocks of DISK that read as zeros and shrink the file (like Optimize-VHD, offline), crash-safe."""
    render.compact_starting(disk, mode, dry_run, resume)
    progress = Progress(os.path.getsize(disk), "compact: bytes scanned, then moved")
    result = compact_image(disk, mode, dry_run=dry_run, force=force, resume=resume, parent=parent,
                           search_dirs=search_dirs, progress=progress)
    progress.finish()
    render.compacted(result, disk, dry_run)
