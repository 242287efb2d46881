"""``vhdx``: the command line. Each command parses its options, calls the library once and renders."""

from __future__ import annotations

import os

import click

import vhdx
from vhdx.errors import ChainError
from vhdx.format.constants import FILE_SIGNATURE
from vhdx.ops.convert import flatten, import_raw
from vhdx.ops.export import export_raw, stream_raw
from vhdx.ops.inspect import describe_chain, describe_image, describe_parent
from vhdx_cli import render
from vhdx_cli.common import (
    SIZE,
    OneLineErrorGroup,
    Progress,
    State,
    chain_options,
    handle_errors,
    json_wanted,
    log_replayed_in_memory,
    open_kwargs,
    report_invented,
    salvage_option,
    warn_if_being_written,
)

EXISTING_FILE = click.Path(exists=True, dir_okay=False)


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vhdx-chain")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output (same as the per-command flag).")
@click.option("-v", "--verbose", is_flag=True, help="More detail.")
@click.option("-p", "--progress", is_flag=True, help="Show progress bars even when stderr is not a terminal.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars and no warnings (errors still print).")
@click.pass_context
def cli(ctx, as_json, verbose, progress, quiet):
    """Read, check, repair and merge VHDX/AVHDX disks and Hyper-V checkpoint chains."""
    ctx.obj = State(as_json, verbose, progress, quiet)


def json_option(func):
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")(func)


def wants_json(ctx, as_json: bool) -> bool:
    return as_json or (ctx.obj is not None and ctx.obj.as_json)


@cli.command()
@click.argument("path", type=EXISTING_FILE)
@chain_options
@json_option
@click.pass_context
@handle_errors
def info(ctx, path, as_json, **chain_opts):
    """Show headers, regions, metadata, BAT state counts, log state and parent locator of PATH.

    For a differencing disk also how its parent resolves, or with --orphan how much the file holds alone.
    """
    with vhdx.open(path, **open_kwargs(**chain_opts)) as image:
        described = describe_image(image)
        described.parent_status = describe_parent(image)
        warn_if_being_written(image)
        replayed = log_replayed_in_memory(image)
    if wants_json(ctx, as_json):
        render.emit_json({**render.with_absolute_path(described.to_json(), path), "log_replayed_in_memory": replayed})
    else:
        click.echo(render.info_text(described))


@cli.command()
@click.argument("path", type=EXISTING_FILE)
@chain_options
@json_option
@click.pass_context
@handle_errors
def chain(ctx, path, as_json, **chain_opts):
    """List each layer from PATH down to its base disk, with linkage checks and a timeline."""
    with vhdx.open(path, **open_kwargs(**chain_opts)) as image:
        described = describe_chain(image)
        warn_if_being_written(image)
        replayed = log_replayed_in_memory(image)
    if wants_json(ctx, as_json):
        render.emit_json({**described.to_json(), "log_replayed_in_memory": replayed})
    else:
        click.echo(render.chain_text(described))
    if described.error:
        raise SystemExit(1)


@cli.command(name="map")
@click.argument("path", type=EXISTING_FILE)
@chain_options
@json_option
@click.pass_context
@handle_errors
def map_(ctx, path, as_json, **chain_opts):
    """Show which layer and file offset supply each extent of the virtual disk (like qemu-img map)."""
    with vhdx.open(path, **open_kwargs(**chain_opts)) as image:
        # --orphan: what the file does not hold is listed as absent (its parent is not read).
        parent_missing = image.has_parent and image.options.orphan
        try:
            extents, layers = image.extents(), image.layers
        except ChainError as exc:
            click.echo(f"vhdx: warning: {render.printable(exc)}; mapping this layer alone", err=True)
            parent_missing, layers = True, [image]
            extents = image.extents(through_parents=False)
        rows = render.map_rows(extents, [os.path.abspath(layer.path) for layer in layers], parent_missing,
                               [(layer.bat.state_view, layer.geometry.block_size) for layer in layers])
        warn_if_being_written(image)
        replayed = log_replayed_in_memory(image)
    if wants_json(ctx, as_json):  # an object like every other command's (qemu-img map prints a bare array)
        render.emit_json({**render.with_absolute_path({}, path), "log_replayed_in_memory": replayed, "extents": rows})
    else:
        click.echo(render.map_text(rows))


@cli.command()
@click.argument("source", type=EXISTING_FILE)
@click.argument("destination", type=click.Path(dir_okay=False))
@click.option("-O", "--output-format", "output_format", type=click.Choice(["raw", "vhdx"]), default="raw",
              show_default=True, help="Format of DESTINATION.")
@click.option("-f", "--source-format", "source_format", type=click.Choice(["vhdx", "raw"]),
              help="Format of SOURCE (default: vhdx if it starts with the VHDX signature, else raw).")
@click.option("--type", "disk_type", type=click.Choice(["dynamic", "fixed", "differencing"]), default="dynamic",
              show_default=True, help="Type of a VHDX DESTINATION (differencing: a child of --parent holding only "
              "the sectors that differ from it).")
@click.option("--keep-id", is_flag=True, help="Give a VHDX DESTINATION the source's Virtual Disk ID (Convert-VHD).")
@click.option("--block-size", type=SIZE, help="Block size of a VHDX DESTINATION (default 32M, or the source's).")
@click.option("--force", is_flag=True, help="Overwrite DESTINATION if it exists.")
@click.option("--sync", is_flag=True, help="fsync DESTINATION before it takes its name (default: OS write-back).")
@click.option("--no-sparse", is_flag=True, help="-O raw: write every byte, zeros included (a fully allocated file).")
@chain_options
@salvage_option
@click.pass_context
@handle_errors
def convert(ctx, source, destination, output_format, source_format, disk_type, block_size, force, sync, keep_id,
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
        _convert_json(source, destination, source_format, output_format, False)
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
    _convert_json(source, destination, source_format, output_format, replayed)


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
            from vhdx.ops.convert_type import make_child

            make_child(image, destination, new_parent, block_size=block_size, keep_id=keep_id, overwrite=force,
                       progress=progress, sync=sync)
        else:
            flatten(image, destination, type=disk_type, block_size=block_size, overwrite=force, progress=progress,
                    sync=sync, keep_id=keep_id)
        progress.finish()
        warn_if_being_written(image)
        replayed = log_replayed_in_memory(image)
    _convert_json(source, destination, source_format, output_format, replayed)


def _convert_json(source: str, destination: str, source_format: str, output_format: str, replayed: bool) -> None:
    """What convert wrote, in --json mode (otherwise it prints nothing, as qemu-img does)."""
    if json_wanted():
        render.emit_json({"source": os.path.abspath(source), "destination": os.path.abspath(destination),
                          "destination_given": destination, "source_format": source_format,
                          "output_format": output_format, "destination_size": os.path.getsize(destination),
                          "log_replayed_in_memory": replayed})


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


# Commands that live in their own modules, imported only when run (or listed by --help): `vhdx info`
# should not pay for loading the merge engine, the Hyper-V backend or matplotlib-backed benches.
cli.lazy_commands.update({
    "create": "vhdx_cli.write_cmds:create",
    "write": "vhdx_cli.write_cmds:write",
    "discard": "vhdx_cli.write_cmds:discard",
    "set-parent": "vhdx_cli.write_cmds:set_parent",
    "check": "vhdx_cli.check_cmds:check",
    "repair": "vhdx_cli.check_cmds:repair",
    "diff": "vhdx_cli.forensics_cmds:diff",
    "compare": "vhdx_cli.compare_cmds:compare",
    "partitions": "vhdx_cli.partition_cmds:partitions",
    "hash": "vhdx_cli.forensics_cmds:hash_",
    "slack": "vhdx_cli.forensics_cmds:slack",
    "serve": "vhdx_cli.forensics_cmds:serve",
    "mount": "vhdx_cli.forensics_cmds:mount",
    "merge": "vhdx_cli.merge_cmds:merge",
    "flatten": "vhdx_cli.merge_cmds:flatten",
    "hyperv": "vhdx_cli.hyperv:hyperv",
    "bench": "vhdx_cli.bench_cmds:bench",
    "fixture": "vhdx_cli.fixture_cmds:fixture",
    "vm": "vhdx_cli.vm_cmds:vm",
    "scan": "vhdx_cli.scan_cmds:scan",
    "resize": "vhdx_cli.resize_cmds:resize",
    "compact": "vhdx_cli.resize_cmds:compact",
})


def main() -> None:  # pragma: no cover - console entry for `python -m vhdx_cli.main`
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
