"""``vhdx convert``: a disk (with its whole chain) or a raw image into raw or VHDX, like qemu-img convert."""

from __future__ import annotations

import os

import click

import vhdx
from vhdx.format.constants import FILE_SIGNATURE
from vhdx.ops.convert import flatten, import_raw
from vhdx.ops.convert_type import make_child
from vhdx.ops.export import export_raw, stream_raw
from vhdx_cli import render
from vhdx_cli.common import (
    SIZE,
    Progress,
    handle_errors,
    log_replayed_in_memory,
    report_invented,
    warn_if_being_written,
)
from vhdx_cli.options import (
    EXISTING_FILE,
    NEW_FILE,
    chain_options,
    force_option,
    json_option,
    open_kwargs,
    salvage_option,
)


@click.command()
@click.argument("source", type=EXISTING_FILE)
@click.argument("destination", type=NEW_FILE)
@click.option("-O", "--output-format", "output_format", type=click.Choice(["raw", "vhdx"]), default="raw",
              show_default=True, help="Format of DESTINATION.")
@click.option("-f", "--source-format", "source_format", type=click.Choice(["vhdx", "raw"]),
              help="Format of SOURCE (default: vhdx if it starts with the VHDX signature, else raw).")
@click.option("--type", "disk_type", type=click.Choice(["dynamic", "fixed", "differencing"]), default="dynamic",
              show_default=True, help="Type of a VHDX DESTINATION (differencing: a child of --parent holding only "
              "the sectors that differ from it).")
@click.option("--keep-id", is_flag=True, help="Give a VHDX DESTINATION the source's Virtual Disk ID (Convert-VHD).")
@click.option("--block-size", type=SIZE, help="Block size of a VHDX DESTINATION (default 32M, or the source's).")
@force_option("Overwrite DESTINATION if it exists.")
@click.option("--sync", is_flag=True, help="fsync DESTINATION before it takes its name (default: OS write-back).")
@click.option("--no-sparse", is_flag=True, help="-O raw: write every byte, zeros included (a fully allocated file).")
@chain_options
@salvage_option
@json_option
@handle_errors
def convert(source, destination, output_format, source_format, disk_type, block_size, force, sync, keep_id,
            salvage, no_sparse=False, **chain_opts):
    """Convert SOURCE (a VHDX with its whole chain, or a raw image) into DESTINATION.

    To raw, runs that read as zeros (4 KiB zero runs inside data too) stay sparse holes unless --no-sparse; to VHDX,
    all-zero blocks stay unallocated. With --type differencing, --parent names the new disk's parent (SOURCE's own
    parents are found by its locator). DESTINATION "-" writes the raw disk to stdout.
    """
    if os.path.abspath(source) == os.path.abspath(destination):
        raise click.UsageError("SOURCE and DESTINATION are the same file")
    if no_sparse and (output_format != "raw" or destination == "-"):
        raise click.UsageError("--no-sparse applies to -O raw into a file (a pipe or device gets every byte anyway)")
    if destination == "-":
        _convert_to_stdout(source, output_format, chain_opts, salvage)
        return
    source_format = source_format or ("vhdx" if is_vhdx_file(source) else "raw")
    if disk_type == "differencing" or keep_id:
        _convert_type(source, destination, output_format, source_format, disk_type, block_size, force, sync, keep_id,
                      chain_opts)
        return
    if source_format == "raw":
        if output_format != "vhdx":
            raise click.UsageError("a raw SOURCE converts to -O vhdx")
        progress = Progress(os.path.getsize(source), "convert")
        import_raw(source, destination, type=disk_type, block_size=block_size, overwrite=force, progress=progress,
                   sync=sync)
        progress.finish()
        render.converted(source, destination, source_format, output_format, False)
        return
    with vhdx.open(source, **open_kwargs(**chain_opts), salvage=salvage) as image:
        progress = Progress(image.virtual_size, "convert")
        if output_format == "raw":
            export_raw(image, destination, overwrite=force, progress=progress, sync=sync, sparse=not no_sparse)
        else:
            flatten(image, destination, type=disk_type, block_size=block_size, overwrite=force, progress=progress,
                    sync=sync)
        progress.finish()
        report_invented(image)
        warn_if_being_written(image)
        replayed = log_replayed_in_memory(image)
    render.converted(source, destination, source_format, output_format, replayed)


def _convert_type(source, destination, output_format, source_format, disk_type, block_size, force, sync, keep_id,
                  chain_opts) -> None:
    """Convert-VHD's --type differencing and --keep-id (VHDX to VHDX only)."""
    if output_format != "vhdx" or source_format != "vhdx":
        raise click.UsageError("--type differencing and --keep-id convert a VHDX SOURCE to -O vhdx")
    chain_opts = dict(chain_opts)
    new_parent = None
    if disk_type == "differencing":
        new_parent, chain_opts["parent"] = chain_opts["parent"], None
        if not new_parent:
            raise click.UsageError("--type differencing needs --parent (the new disk's parent)")
    with vhdx.open(source, **open_kwargs(**chain_opts)) as image:
        progress = Progress(image.virtual_size, "convert")
        if new_parent:
            make_child(image, destination, new_parent, block_size=block_size, keep_id=keep_id, overwrite=force,
                       progress=progress, sync=sync)
        else:
            flatten(image, destination, type=disk_type, block_size=block_size, overwrite=force, progress=progress,
                    sync=sync, keep_id=keep_id)
        progress.finish()
        warn_if_being_written(image)
        replayed = log_replayed_in_memory(image)
    render.converted(source, destination, source_format, output_format, replayed)


def _convert_to_stdout(source: str, output_format: str, chain_opts: dict, salvage: bool) -> None:
    """``convert SRC -``: the raw virtual disk on stdout, for pipes (dd, ssh, hashers)."""
    if output_format != "raw":
        raise click.UsageError("only -O raw can go to stdout (a VHDX is written with seeks)")
    out = click.get_binary_stream("stdout")
    if out.isatty():
        raise click.UsageError("refusing to write a disk image to a terminal; redirect stdout")
    with vhdx.open(source, **open_kwargs(**chain_opts), salvage=salvage) as image:
        progress = Progress(image.virtual_size, "convert")
        stream_raw(image, out, progress=progress)
        progress.finish()
        report_invented(image)
        warn_if_being_written(image)


def is_vhdx_file(path: str) -> bool:
    if not os.path.isfile(path):
        return True  # FIFOs, devices: let the VHDX reader refuse them (reading a FIFO here would block)
    with open(path, "rb") as f:
        return f.read(len(FILE_SIGNATURE)) == FILE_SIGNATURE
