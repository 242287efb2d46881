"""Commands that diagnose and repair: check and repair (exit codes as ``qemu-img check``)."""

from __future__ import annotations

import click

from vhdx.ops.check import check_image
from vhdx.ops.repair import repair_image
from vhdx_cli import render
from vhdx_cli.common import handle_errors, warn_in_use, warn_replayed

EXISTING_FILE = click.Path(exists=True, dir_okay=False)


def report_lines(report, indent: str = "") -> list[str]:
    """Text of a check report: one line per finding, then a verdict (with each parent's under it)."""
    lines = [f"{indent}{report.path}:"]
    if not report.checked:
        lines.append(f"{indent}  could not check: {report.error}")
    for f in report.findings:
        if f.severity.value == "info":
            continue  # normal states (an older header copy): `vhdx info` shows them, --json lists them
        where = "" if f.offset is None else f" @ {f.offset:#x}"
        fix = " [repairable]" if f.repairable else ""
        lines.append(f"{indent}  {f.severity.value:<7} {f.code} {f.structure}{where}: {f.message}{fix}")
    if report.checked:
        errors = sum(1 for f in report.findings if f.severity.value == "error")
        leaks = sum(1 for f in report.findings if f.severity.value == "leak")
        if errors:
            lines.append(f"{indent}  {errors} error(s) found")
        elif leaks:
            lines.append(f"{indent}  no corruption; {report.leaked_bytes} leaked bytes")
        else:
            lines.append(f"{indent}  no errors were found")
        if report.free_bytes:
            lines.append(f"{indent}  {report.free_bytes} bytes of free space between structures (not a leak; "
                         "reclaimable by compaction, e.g. vhdx convert)")
    for parent in report.parents:
        lines.extend(report_lines(parent, indent + "  "))
    return lines


# Findings of a dirty log that check read replayed in memory (the file is left as it is).
REPLAYED_CODES = frozenset({"LOG_DIRTY", "LOG_IN_USE"})


@click.command()
@click.argument("path", type=EXISTING_FILE)
@click.option("--chain", "whole_chain", is_flag=True, help="Also check every parent down to the base disk.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.pass_context
@handle_errors
def check(ctx, path, whole_chain, as_json):
    """Check PATH for corruption and leaked space (exit 0 clean, 2 corruption, 3 only leaks, 1 unreadable)."""
    report = check_image(path, chain=whole_chain)
    checked_all = (report, *report.parents)
    replayed = any({f.code for f in checked.findings} & REPLAYED_CODES for checked in checked_all)
    if as_json or (ctx.obj is not None and ctx.obj.as_json):
        render.emit_json({**render.with_absolute_path(report.to_json(), path), "log_replayed_in_memory": replayed})
    else:
        click.echo(render.printable_lines(report_lines(report)))
    for checked in checked_all:
        codes = {f.code for f in checked.findings}
        if "IN_USE" in codes:
            warn_in_use(checked.path)
        if codes & REPLAYED_CODES:
            warn_replayed(checked.path)
    ctx.exit(report.exit_code)


@click.command()
@click.argument("path", type=EXISTING_FILE)
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing (exit as the real run).")
@click.option("--backup", type=click.Path(dir_okay=False), help="Copy PATH here (sparse) before changing it.")
@click.option("--leaks", is_flag=True, help="Also truncate leaked space at the end of the file.")
@click.option("--parent", type=EXISTING_FILE, help="Relink PATH to this parent (moved or replaced parent).")
@click.option("--ignore-id-mismatch", is_flag=True, help="With --parent: accept a DataWriteGuid mismatch.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.pass_context
@handle_errors
def repair(ctx, path, dry_run, backup, leaks, parent, ignore_id_mismatch, as_json):
    """Repair what check finds in PATH, crash-safely; print every change (exit 0 fixed, 2 corruption left)."""
    if ignore_id_mismatch and not parent:
        raise click.UsageError("--ignore-id-mismatch needs --parent")
    result = repair_image(path, dry_run=dry_run, backup=backup, leaks=leaks, parent=parent,
                          ignore_id_mismatch=ignore_id_mismatch)
    if as_json or (ctx.obj is not None and ctx.obj.as_json):
        render.emit_json(render.with_absolute_path(result.to_json(), path))
    else:
        click.echo(render.printable_lines(repair_lines(result)))
    ctx.exit(result.exit_code)


def repair_lines(result) -> list[str]:
    lines = []
    if result.backup:
        lines.append(f"backup: {result.backup}")
    verb = "would" if result.dry_run else "will"
    if not result.plan.actions:
        lines.append("nothing to repair")
    for action in result.plan.actions:
        lines.append(f"{verb}: {action.description}")
    for refusal in result.plan.refusals:
        where = "" if refusal.offset is None else f" @ {refusal.offset:#x}"
        lines.append(f"refused: {refusal.code} {refusal.structure}{where}: {refusal.reason}")
    for change in result.changes:
        lines.append(f"changed: {change}")
    if result.after is not None and not result.dry_run and result.plan.actions:
        lines.append("after repair:")
        lines.extend(report_lines(result.after, "  "))
    return lines
