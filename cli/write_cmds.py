"""Commands that create or change disks: create, write, discard, set-parent."""

from __future__ import annotations

import os

import click

import vhdx
from vhdx.errors import InvalidRequestError
from vhdx.format.foreign import FOREIGN_EXTENSIONS
from vhdx.ops.create import create as create_disk
from vhdx.ops.relink import set_parent as relink
from vhdx_cli import render
from vhdx_cli.common import SIZE, current_state, handle_errors, json_wanted


@click.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("-s", "--size", type=SIZE, help="Virtual size (K/M/G/T suffixes); a child takes its parent's.")
@click.option("-t", "--type", "disk_type", type=click.Choice(["dynamic", "fixed", "differencing"]),
              help="Disk type (default dynamic; differencing when --parent is given).")
@click.option("--block-size", type=SIZE, help="Block size: 1M..256M, power of two (default 32M; 2M for a child).")
@click.option("--logical-sector-size", type=click.Choice(["512", "4096"]), help="Default 512 (a child: parent's).")
@click.option("--physical-sector-size", type=click.Choice(["512", "4096"]), help="Default 4096 (a child: parent's).")
@click.option("--parent", type=click.Path(exists=True, dir_okay=False), help="Parent of a differencing disk.")
@click.option("--force", is_flag=True, help="Overwrite an existing file; allow a name like .vhd or .qcow2.")
@handle_errors
def create(path, size, disk_type, block_size, logical_sector_size, physical_sector_size, parent, force):
    """Create a VHDX/AVHDX file (like New-VHD / qemu-img create)."""
    promised = FOREIGN_EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if promised and not force:
        raise click.UsageError(f"{path}: the name promises a {promised} disk, but create writes VHDX; name it "
                               ".vhdx or .avhdx, or pass --force to keep this name")
    if disk_type == "differencing" and not parent:
        raise click.UsageError("--type differencing needs --parent")
    if disk_type in ("dynamic", "fixed") and parent:
        raise click.UsageError(f"--type {disk_type} cannot have --parent")
    create_disk(path, size, type=disk_type or ("differencing" if parent else "dynamic"), block_size=block_size,
                logical_sector_size=int(logical_sector_size) if logical_sector_size else None,
                physical_sector_size=int(physical_sector_size) if physical_sector_size else None,
                parent=parent, overwrite=force)
    with vhdx.open(path) as image:
        data = {"path": os.path.abspath(path), "path_given": path, "disk_type": image.disk_type.label,
                "virtual_size": image.virtual_size, "block_size": image.block_size,
                "parent": os.path.abspath(parent) if parent else None}
    render.report(data, f"created {path}")


def dependents_options(func):
    """--force and --search-dir: writing a disk that differencing disks depend on breaks them (as in Hyper-V)."""
    func = click.option("--search-dir", "search_dirs", multiple=True, type=click.Path(file_okay=False, exists=True),
                        help="Also look here for disks that depend on DISK (repeatable).")(func)
    return click.option("--force", is_flag=True,
                        help="Write even though other disks depend on DISK (they will refuse to open).")(func)


@click.command()
@click.argument("disk", type=click.Path(exists=True, dir_okay=False))
@click.option("--offset", type=SIZE, required=True, help="Virtual byte offset.")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False), help="Bytes to write.")
@click.option("--pattern", type=str, help="Byte value to repeat, e.g. 0xa5 (needs --length).")
@click.option("--zero", is_flag=True, help="Write zeros (whole blocks become ZERO where the disk type allows).")
@click.option("--length", type=SIZE, help="Bytes to write with --pattern or --zero.")
@dependents_options
@handle_errors
def write(disk, offset, input_path, pattern, zero, length, force, search_dirs):
    """Write to DISK at --offset from --input, a repeated --pattern byte, or --zero (like qemu-io write)."""
    sources = [x for x in (input_path, pattern, zero or None) if x is not None]
    if len(sources) != 1:
        raise click.UsageError("give exactly one of --input, --pattern, --zero")
    if (pattern is not None or zero) and length is None:
        raise click.UsageError("--pattern and --zero need --length")
    if pattern is not None:
        try:
            value = int(pattern, 0)
        except ValueError:
            value = -1
        if not 0 <= value <= 255:
            raise click.BadParameter(f"{pattern!r} is not a byte value (0..255 or 0x00..0xff)", param_hint="--pattern")
    with vhdx.open(disk, writable=True, force=force, search_dirs=search_dirs) as image:
        if zero:
            image.write_zeros(offset, length)
            done = length
        elif input_path:
            done = _write_file(image, offset, input_path)
        else:
            done = _write_pattern(image, offset, value, length)
    render.report({"path": os.path.abspath(disk), "path_given": disk, "offset": offset, "length": done},
                  f"wrote {done} bytes at offset {offset}")


def _write_file(image, offset: int, path: str) -> int:
    size = os.path.getsize(path)
    if offset + size > image.virtual_size:
        raise InvalidRequestError(f"{size} bytes at {offset} do not fit in the virtual disk ({image.virtual_size})")
    step = 8 << 20
    with open(path, "rb") as f:
        for pos in range(0, size, step):
            image.write(offset + pos, f.read(step))
    return size


def _write_pattern(image, offset: int, value: int, length: int) -> int:
    step = 8 << 20
    chunk = bytes([value]) * min(step, length)
    for pos in range(0, length, step):
        image.write(offset + pos, chunk[: min(step, length - pos)])
    return length


@click.command()
@click.argument("disk", type=click.Path(exists=True, dir_okay=False))
@click.option("--offset", type=SIZE, required=True)
@click.option("--length", type=SIZE, required=True)
@dependents_options
@handle_errors
def discard(disk, offset, length, force, search_dirs):
    """Trim a range: whole blocks inside it read as zeros afterwards (like qemu-io discard)."""
    with vhdx.open(disk, writable=True, force=force, search_dirs=search_dirs) as image:
        done = image.discard(offset, length)
        fixed = image.params.leave_block_allocated and not image.has_parent
        block_size = image.block_size
    if fixed:
        why = " (a fixed disk keeps its blocks allocated; nothing changed)"
    elif not done:
        why = f" (no whole block ({block_size} bytes) in the range was still mapped; nothing changed)"
    else:
        why = f" (whole blocks only; parts of the {length}-byte range in partial blocks are left as they are)" \
            if done < length else ""
    render.report({"path": os.path.abspath(disk), "path_given": disk, "offset": offset, "length": length,
                   "discarded_bytes": done}, f"discarded {done} bytes at offset {offset}{why}")


@click.command(name="set-parent")
@click.argument("child", type=click.Path(exists=True, dir_okay=False))
@click.argument("parent", type=click.Path(exists=True, dir_okay=False))
@click.option("--ignore-id-mismatch", is_flag=True, help="Accept and re-link a parent whose DataWriteGuid differs.")
@click.option("--dry-run", is_flag=True, help="Show the new parent locator and change nothing.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def set_parent(child, parent, ignore_id_mismatch, dry_run, as_json):
    """Point CHILD at PARENT (like Set-VHD -ParentPath [-IgnoreIdMismatch])."""
    result = relink(child, parent, ignore_id_mismatch=ignore_id_mismatch, dry_run=dry_run)
    if not current_state().quiet:
        for warning in result.warnings:
            click.echo(f"vhdx: warning: {render.printable(warning)}", err=True)
    new = dict(result.new_entries)
    removed = [key for key, _ in result.old_entries if key not in new]
    if as_json or json_wanted():
        render.emit_json({"child": os.path.abspath(child), "child_given": child, "parent": os.path.abspath(parent),
                          "parent_given": parent, "dry_run": dry_run,
                          "linkage_matched": result.linkage_matched, "old": dict(result.old_entries),
                          "new": new, "removed": removed, "warnings": list(result.warnings)})
        return
    lines = [("would change" if dry_run else "changed") + f" parent locator of {child}:"]
    old_entries = dict(result.old_entries)
    for key, value in result.new_entries:
        old = old_entries.get(key)
        lines.append(f"  {key}: {old} -> {value}" if old != value else f"  {key}: {value} (unchanged)")
    lines += [f"  {key}: {old_entries[key]} -> (removed)" for key in removed]
    click.echo(render.printable_lines(lines))
