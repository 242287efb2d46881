"""Commands that read a disk and its chain: info, chain and map (read-only; a writer at work is only named)."""

from __future__ import annotations

import os

import click

from vhdx.errors import ChainError
from vhdx.ops.inspect import describe_image, describe_parent
from vhdx_cli import render
from vhdx_cli.common import handle_errors
from vhdx_cli.options import EXISTING_FILE, chain_options, json_option, reading


@click.command()
@click.argument("path", type=EXISTING_FILE)
@chain_options
@json_option
@handle_errors
def info(path, **chain_opts):
    """Show headers, regions, metadata, BAT state counts, log state and parent locator of PATH.

    For a differencing disk also how its parent resolves, or with --orphan how much the file holds alone.
    """
    with reading(path, chain_opts) as opened:
        described = describe_image(opened.image)
        described.parent_status = describe_parent(opened.image)
    render.info(described, path, opened.replayed)


@click.command()
@click.argument("path", type=EXISTING_FILE)
@chain_options
@json_option
@handle_errors
def chain(path, **chain_opts):
    """List each layer from PATH down to its base disk, with linkage checks and a timeline."""
    from vhdx.ops.chain_info import describe_chain  # noqa: PLC0415 - chain only (start-up cost of info and map)

    with reading(path, chain_opts) as opened:
        described = describe_chain(opened.image)
    render.chain(described, opened.replayed)
    if described.error:
        raise SystemExit(1)


@click.command(name="map")
@click.argument("path", type=EXISTING_FILE)
@chain_options
@json_option
@handle_errors
def map_(path, **chain_opts):
    """Show which layer and file offset supply each extent of the virtual disk (like qemu-img map)."""
    with reading(path, chain_opts) as opened:
        image = opened.image
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
    render.map_(rows, path, opened.replayed)
