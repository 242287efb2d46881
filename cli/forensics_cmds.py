"""Forensic commands: diff, hash, slack, serve, mount. Every one opens its inputs read-only."""

from __future__ import annotations

import os

import click

import vhdx
from vhdx.errors import InvalidRequestError
from vhdx.forensics import nbd
from vhdx.forensics.diff import diff_layers
from vhdx.forensics.hashing import check_algorithms, hash_disk
from vhdx.forensics.layers import find_layer
from vhdx.forensics.slack import find_chain_slack
from vhdx_cli import render
from vhdx_cli.common import (
    SIZE,
    Progress,
    handle_errors,
    report_invented,
    warn_if_being_written,
)
from vhdx_cli.options import EXISTING_FILE, chain_options, json_option, open_kwargs, reading, salvage_option


def _layer_option(func):
    return click.option("--at", "at", default="0", show_default=True, metavar="LAYER",
                        help="Layer to export: depth (0 = CHAIN itself, 1 = its parent, ...) or a layer's path.")(func)


def _partition_option(func):
    return click.option("--partition", type=click.IntRange(min=1),
                        help="Export only partition N of the disk (see `vhdx partitions`).")(func)


def partition_view(layer, number: int):
    from vhdx.ops.partitions import PartitionView, image_partitions, select  # noqa: PLC0415 - start-up (issue 15 item 2)

    return PartitionView(layer, select(image_partitions(layer), number))


@click.command()
@click.argument("child", type=EXISTING_FILE)
@click.option("--against", "ancestor", type=EXISTING_FILE, help="Ancestor to compare with (default: the parent).")
@click.option("--blocks", is_flag=True, help="Whole payload blocks (what each layer allocated), not exact sectors.")
@click.option("--sectors", is_flag=True, hidden=True, help="Sector granularity (the default; kept for scripts).")
@click.option("--algo", "algorithm", default="sha256", show_default=True, help="Hash of each extent's content.")
@chain_options
@salvage_option
@json_option
@handle_errors
def diff(child, ancestor, blocks, sectors, algorithm, salvage, **chain_opts):
    """Show the virtual ranges the layers from CHILD down to ANCESTOR wrote, with hashes of new and old content.

    Sector-exact by default (from the sector bitmaps); --blocks reports whole payload blocks.
    """
    if blocks and sectors:
        raise click.UsageError("--blocks and --sectors exclude each other")
    if ancestor and chain_opts["orphan"]:
        raise click.UsageError("--against needs the chain; it cannot be used with --orphan")
    (algorithm,) = check_algorithms([algorithm])
    with reading(child, chain_opts, salvage=salvage) as opened:
        result = diff_layers(opened.image, ancestor, sectors=not blocks, algorithm=algorithm)
    render.diff(result, algorithm, opened.replayed)


@click.command(name="hash")
@click.argument("path", type=EXISTING_FILE)
@click.option("--algo", "algorithms", default="sha256", show_default=True,
              help="Comma-separated algorithms, e.g. sha256,md5,sha1 (all computed in one pass).")
@click.option("--piece-size", type=SIZE, help="Also hash every piece of this size (e.g. 1M, 1G).")
@click.option("--no-layers", is_flag=True, help="Skip hashing each layer file.")
@click.option("--partition", type=click.IntRange(min=1), help="Hash only partition N (see `vhdx partitions`).")
@chain_options
@salvage_option
@json_option
@handle_errors
def hash_(path, algorithms, piece_size, no_layers, partition, salvage, **chain_opts):
    """Hash the virtual disk of PATH through its chain (= hash of the flattened raw image) and each layer file."""
    algos = check_algorithms(algorithms.split(","))
    if partition is not None:
        from vhdx_cli.partition_cmds import hash_partition  # noqa: PLC0415 - start-up: another command module, only for --partition

        with reading(path, chain_opts, salvage=salvage) as opened:
            hash_partition(opened.image, partition, algorithms)
        return
    with reading(path, chain_opts, salvage=salvage) as opened:
        progress = Progress(opened.image.virtual_size, "hash")
        result = hash_disk(opened.image, algos, piece_size, layer_files=not no_layers, progress=progress)
        progress.finish()
    render.hashed(result, piece_size, opened.replayed)


@click.command()
@click.argument("path", type=EXISTING_FILE)
@click.option("--extract", "extract_dir", type=click.Path(file_okay=False),
              help="Copy every non-zero run of slack into this folder (one file per run).")
@click.option("--all", "show_all", is_flag=True, help="Also list slack areas that hold only zeros.")
@chain_options
@json_option
@handle_errors
def slack(path, extract_dir, show_all, **chain_opts):
    """Find space no structure references in PATH and its ancestors (only PATH with --orphan)."""
    with reading(path, chain_opts) as opened:
        reports = find_chain_slack(opened.image, extract_dir=extract_dir)
    render.slack(reports, path, show_all, opened.replayed)


@click.command()
@click.argument("chain", type=EXISTING_FILE)
@_layer_option
@click.option("--port", type=click.IntRange(1, 65535), help=f"TCP port on 127.0.0.1 (default {nbd.DEFAULT_PORT}).")
@click.option("--unix", "unix", type=click.Path(dir_okay=False), help="Serve on this Unix socket instead of TCP.")
@_partition_option
@chain_options
@salvage_option
@json_option
@handle_errors
def serve(chain, at, port, unix, partition, salvage, **chain_opts):
    """Export the virtual disk (at any layer) read-only over NBD with nbdkit, until interrupted."""
    if port is not None and unix is not None:
        raise click.UsageError("give --port or --unix, not both")
    if unix is not None and os.path.exists(unix):
        raise InvalidRequestError(f"{unix} exists")
    exe = nbd.check_nbdkit()
    opts = {**open_kwargs(**chain_opts), "salvage": salvage}
    with vhdx.open(chain, **opts) as image:
        depth = find_layer(image, at)
        layer_path, size = image.layers[depth].path, image.layers[depth].virtual_size
        warn_if_being_written(image)
        report_invented(image)
        if partition is not None:  # checked here, so a bad number is a clear error before nbdkit starts
            size = partition_view(image.layers[depth], partition).virtual_size
    argv = nbd.nbdkit_command(exe, chain, at=depth, port=port, unix=unix, partition=partition, **opts)
    uri = nbd.export_uri(port, unix)
    render.serving(chain, uri, depth, layer_path, size, argv)
    code = nbd.run_server(argv, unix)
    if code:
        raise SystemExit(code)


@click.command()
@click.argument("chain", type=EXISTING_FILE)
@click.argument("mountpoint", type=click.Path(file_okay=False, exists=True))
@_layer_option
@_partition_option
@chain_options
@json_option
@handle_errors
def mount(chain, mountpoint, at, partition, **chain_opts):
    """Expose the virtual disk (at any layer) as one read-only raw file under MOUNTPOINT (FUSE), until unmounted."""
    # Late: start-up of the other forensics commands (issue 15 item 2); load_fuse() reports a missing mfusepy.
    from vhdx.forensics.fuse import load_fuse, raw_name  # noqa: PLC0415
    from vhdx.forensics.fuse import mount as fuse_mount  # noqa: PLC0415

    load_fuse()
    with vhdx.open(chain, **open_kwargs(**chain_opts)) as image:
        depth = find_layer(image, at)
        layer = image.layers[depth]
        warn_if_being_written(image)
        if partition is not None:
            layer = partition_view(layer, partition)

        def ready(file_path: str) -> None:
            render.mounted(chain, mountpoint, file_path, depth, layer)

        name = f"{os.path.splitext(raw_name(layer.path))[0]}-p{partition}.raw" if partition is not None else None
        fuse_mount(layer, mountpoint, name=name, ready=ready)


COMMANDS = (diff, hash_, slack, serve, mount)
