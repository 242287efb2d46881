"""The read commands ``info``, ``chain`` and ``map`` (loaded when one of them runs)."""

from __future__ import annotations

import os

import click

import vhdx
from vhdx.errors import ChainError
from vhdx.ops.inspect import describe_chain, describe_image, describe_parent
from vhdx_cli import render
from vhdx_cli.common import chain_options, handle_errors, log_replayed_in_memory, open_kwargs, warn_if_being_written

EXISTING_FILE = click.Path(exists=True, dir_okay=False)


def json_option(func):
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")(func)


def wants_json(ctx, as_json: bool) -> bool:
    return as_json or (ctx.obj is not None and ctx.obj.as_json)


@click.command()
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


@click.command()
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


@click.command(name="map")
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
