"""Commands that diagnose and repair: check and repair (exit codes as ``qemu-img check``)."""

from __future__ import annotations

import click

from vhdx.ops.check import check_image
from vhdx_cli import render
from vhdx_cli.common import handle_errors, warn_in_use, warn_replayed
from vhdx_cli.options import EXISTING_FILE, chain_options, dry_run_option, json_option

# Findings of a dirty log that check read replayed in memory (the file is left as it is).
REPLAYED_CODES = frozenset({"LOG_DIRTY", "LOG_IN_USE"})


@click.command()
@click.argument("path", type=EXISTING_FILE)
@click.option("--chain", "whole_chain", is_flag=True, help="Also check every parent down to the base disk.")
@chain_options(only=("parent", "search_dirs", "ignore_id_mismatch"))
@json_option
@click.pass_context
@handle_errors
def check(ctx, path, whole_chain, **chain_opts):
    """Check PATH for corruption and leaked space (exit 0 clean, 2 corruption, 3 only leaks, 1 unreadable)."""
    report = check_image(path, chain=whole_chain, **chain_opts)
    checked_all = (report, *report.parents)
    replayed = any({f.code for f in checked.findings} & REPLAYED_CODES for checked in checked_all)
    render.checked(report, path, replayed)
    for checked in checked_all:
        codes = {f.code for f in checked.findings}
        if "IN_USE" in codes:
            warn_in_use(checked.path)
        if codes & REPLAYED_CODES:
            warn_replayed(checked.path)
    ctx.exit(report.exit_code)


@click.command()
@click.argument("path", type=EXISTING_FILE)
@dry_run_option("Show what would change; change nothing (exit as the real run).")
@click.option("--backup", type=click.Path(dir_okay=False), help="Copy PATH here (sparse) before changing it.")
@click.option("--leaks", is_flag=True, help="Also truncate leaked space at the end of the file.")
@click.option("--parent", type=EXISTING_FILE, help="Relink PATH to this parent (moved or replaced parent).")
@click.option("--ignore-id-mismatch", is_flag=True, help="With --parent: accept a DataWriteGuid mismatch.")
@json_option
@click.pass_context
@handle_errors
def repair(ctx, path, dry_run, backup, leaks, parent, ignore_id_mismatch):
    """Repair what check finds in PATH, crash-safely; print every change (exit 0 fixed, 2 corruption left)."""
    if ignore_id_mismatch and not parent:
        raise click.UsageError("--ignore-id-mismatch needs --parent")
    from vhdx.ops.repair import repair_image  # noqa: PLC0415 - repair only: check must not load the repair engine

    result = repair_image(path, dry_run=dry_run, backup=backup, leaks=leaks, parent=parent,
                          ignore_id_mismatch=ignore_id_mismatch)
    render.repaired(result, path)
    ctx.exit(result.exit_code)
