"""`vhdx compare A B`: do two unrelated disks hold the same content (like qemu-img compare)."""

from __future__ import annotations

import contextlib

import click

import vhdx
from vhdx.forensics.compare import RawDisk, compare_disks
from vhdx_cli import render
from vhdx_cli.common import Progress, errors_exit, json_wanted, log_replayed_in_memory
from vhdx_cli.convert_cmds import is_vhdx_file
from vhdx_cli.options import EXISTING_FILE, chain_options, json_option, open_kwargs

# As qemu-img compare: 0 identical, 1 different, 2 could not compare (an error must not read as "different").
IDENTICAL, DIFFERENT, COULD_NOT_COMPARE = 0, 1, 2


def _open(stack: contextlib.ExitStack, path: str, fmt: str | None, chain_opts: dict):
    if (fmt or ("vhdx" if is_vhdx_file(path) else "raw")) == "raw":
        return stack.enter_context(RawDisk(path))
    return stack.enter_context(vhdx.open(path, **open_kwargs(**chain_opts)))


@click.command()
@click.argument("a", type=EXISTING_FILE)
@click.argument("b", type=EXISTING_FILE)
@click.option("-f", "a_format", type=click.Choice(["vhdx", "raw"]), help="Format of A (default: by its signature).")
@click.option("-F", "b_format", type=click.Choice(["vhdx", "raw"]), help="Format of B (default: by its signature).")
@click.option("-s", "--strict", is_flag=True, help="Disks of different sizes differ (default: the tail must be zeros).")
@chain_options(only=("search_dirs", "ignore_id_mismatch"))
@json_option
@click.pass_context
@errors_exit(COULD_NOT_COMPARE)
def compare(ctx, a, b, a_format, b_format, strict, **chain_opts):
    """Compare the content of disks A and B (VHDX chains or raw images), like qemu-img compare.

    Exit 0 when identical, 1 when they differ (the first differing offset is printed), 2 when they could not
    be compared.
    """
    with contextlib.ExitStack() as stack:
        disk_a, disk_b = _open(stack, a, a_format, chain_opts), _open(stack, b, b_format, chain_opts)
        progress = Progress(max(disk_a.virtual_size, disk_b.virtual_size), "compare")
        result = compare_disks(disk_a, disk_b, strict=strict, all_extents=json_wanted(), progress=progress)
        progress.finish()
        replayed = log_replayed_in_memory(disk_a) or log_replayed_in_memory(disk_b)
    render.compared(result, replayed)
    ctx.exit(IDENTICAL if result.identical else DIFFERENT)
