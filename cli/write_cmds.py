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
from vhdx_cli.common import SIZE, handle_errors
from vhdx_cli.options import EXISTING_FILE, NEW_FILE, dependents_options, dry_run_option, force_option, json_option


@click.command()
@click.argument("path", type=NEW_FILE)
@click.option("-s", "--size", type=SIZE, help="Virtual size (K/M/G/T suffixes); a child takes its parent's.")
@click.option("-t", "--type", "disk_type", type=click.Choice(["dynamic", "fixed", "differencing"]),
              help="Disk type (default dynamic; differencing when --parent is given).")
@click.option("--block-size", type=SIZE, help="Block size: 1M..256M, power of two (default 32M; 2M for a child).")
@click.option("--logical-sector-size", type=click.Choice(["512", "4096"]), help="Default 512 (a child: parent's).")
@click.option("--physical-sector-size", type=click.Choice(["512", "4096"]), help="Default 4096 (a child: parent's).")
@click.option("--parent", type=EXISTING_FILE, help="Parent of a differencing disk.")
@force_option("Overwrite an existing file; allow a name like .vhd or .qcow2.")
@json_option
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
        render.created(image, path, parent)


@click.command()
@click.argument("disk", type=EXISTING_FILE)
@click.option("--offset", type=SIZE, required=True, help="Virtual byte offset.")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False), help="Bytes to write.")
@click.option("--pattern", type=str, help="Byte value to repeat, e.g. 0xa5 (needs --length).")
@click.option("--zero", is_flag=True, help="Write zeros (whole blocks become ZERO where the disk type allows).")
@click.option("--length", type=SIZE, help="Bytes to write with --pattern or --zero.")
@dependents_options("DISK")
@json_option
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
    render.written(disk, offset, done)


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
@click.argument("disk", type=EXISTING_FILE)
@click.option("--offset", type=SIZE, required=True)
@click.option("--length", type=SIZE, required=True)
@dependents_options("DISK")
@json_option
@handle_errors
def discard(disk, offset, length, force, search_dirs):
    """Trim a range: whole blocks inside it read as zeros afterwards (like qemu-io discard)."""
    with vhdx.open(disk, writable=True, force=force, search_dirs=search_dirs) as image:
        done = image.discard(offset, length)
        fixed = image.params.leave_block_allocated and not image.has_parent
        block_size = image.block_size
    render.discarded(disk, offset, length, done, fixed, block_size)


@click.command(name="set-parent")
@click.argument("child", type=EXISTING_FILE)
@click.argument("parent", type=EXISTING_FILE)
@click.option("--ignore-id-mismatch", is_flag=True, help="Accept and re-link a parent whose DataWriteGuid differs.")
@dry_run_option("Show the new parent locator and change nothing.")
@json_option
@handle_errors
def set_parent(child, parent, ignore_id_mismatch, dry_run):
    """Point CHILD at PARENT (like Set-VHD -ParentPath [-IgnoreIdMismatch])."""
    result = relink(child, parent, ignore_id_mismatch=ignore_id_mismatch, dry_run=dry_run)
    render.relinked(result, child, parent, dry_run)
