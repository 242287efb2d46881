"""Forensic commands: diff, hash, slack, serve, mount. Every one opens its inputs read-only."""

from __future__ import annotations

import os
import sys

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
    chain_options,
    handle_errors,
    log_replayed_in_memory,
    open_kwargs,
    report_invented,
    salvage_option,
    warn_if_being_written,
)

EXISTING_FILE = click.Path(exists=True, dir_okay=False)


def _json_option(func):
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")(func)


def _wants_json(ctx, as_json: bool) -> bool:
    return as_json or (ctx.obj is not None and getattr(ctx.obj, "as_json", False))


def _layer_option(func):
    return click.option("--at", "at", default="0", show_default=True, metavar="LAYER",
                        help="Layer to export: depth (0 = CHAIN itself, 1 = its parent, ...) or a layer's path.")(func)


def _partition_option(func):
    return click.option("--partition", type=click.IntRange(min=1),
                        help="Export only partition N of the disk (see `vhdx partitions`).")(func)


def partition_view(layer, number: int):
    from vhdx.ops.partitions import PartitionView, image_partitions, select  # noqa: PLC0415

    return PartitionView(layer, select(image_partitions(layer), number))


@click.command()
@click.argument("child", type=EXISTING_FILE)
@click.option("--against", "ancestor", type=EXISTING_FILE, help="Ancestor to compare with (default: the parent).")
@click.option("--blocks", is_flag=True, help="Whole payload blocks (what each layer allocated), not exact sectors.")
@click.option("--sectors", is_flag=True, hidden=True, help="Sector granularity (the default; kept for scripts).")
@click.option("--algo", "algorithm", default="sha256", show_default=True, help="Hash of each extent's content.")
@chain_options
@salvage_option
@_json_option
@click.pass_context
@handle_errors
def diff(ctx, child, ancestor, blocks, sectors, algorithm, as_json, salvage, **chain_opts):
    """Show the virtual ranges the layers from CHILD down to ANCESTOR wrote, with hashes of new and old content.

    Sector-exact by default (from the sector bitmaps); --blocks reports whole payload blocks.
    """
    if blocks and sectors:
        raise click.UsageError("--blocks and --sectors exclude each other")
    (algorithm,) = check_algorithms([algorithm])
    with vhdx.open(child, **open_kwargs(**chain_opts), salvage=salvage) as image:
        result = diff_layers(image, ancestor, sectors=not blocks, algorithm=algorithm)
        warn_if_being_written(image)
        report_invented(image)
        replayed = log_replayed_in_memory(image)
    if _wants_json(ctx, as_json):
        render.emit_json({**result.to_json(), "log_replayed_in_memory": replayed})
        return
    click.echo(f"child: {render.printable(result.child)}")
    click.echo(f"against: {render.printable(result.ancestor or '(nothing: orphan or base disk)')}")
    click.echo(f"{len(result.extents)} extents, {render.human_size(result.written_bytes)} written "
               f"({result.granularity} granularity)")
    click.echo(f"{'Offset':<18}{'Length':<14}{'Layers':<8}new {algorithm} / old {algorithm}")
    for e in result.extents:
        layers = ",".join(map(str, e.layers))
        click.echo(f"{e.start:<#18x}{e.length:<#14x}{layers:<8}{e.new_digest}")
        click.echo(f"{'':<40}{e.old_digest or '-'}")
    if result.absent:
        click.echo(render.absent_summary(result.absent, "reads as zeros"))


@click.command(name="hash")
@click.argument("path", type=EXISTING_FILE)
@click.option("--algo", "algorithms", default="sha256", show_default=True,
              help="Comma-separated algorithms, e.g. sha256,md5,sha1 (all computed in one pass).")
@click.option("--piece-size", type=SIZE, help="Also hash every piece of this size (e.g. 1M, 1G).")
@click.option("--no-layers", is_flag=True, help="Skip hashing each layer file.")
@click.option("--partition", type=click.IntRange(min=1), help="Hash only partition N (see `vhdx partitions`).")
@chain_options
@salvage_option
@_json_option
@click.pass_context
@handle_errors
def hash_(ctx, path, algorithms, piece_size, no_layers, partition, as_json, salvage, **chain_opts):
    """Hash the virtual disk of PATH through its chain (= hash of the flattened raw image) and each layer file."""
    algos = check_algorithms(algorithms.split(","))
    if partition is not None:
        from vhdx_cli.partition_cmds import hash_partition

        with vhdx.open(path, **open_kwargs(**chain_opts), salvage=salvage) as image:
            result = hash_partition(image, partition, algorithms)
            report_invented(image)
            return result
    with vhdx.open(path, **open_kwargs(**chain_opts), salvage=salvage) as image:
        progress = Progress(image.virtual_size, "hash")
        result = hash_disk(image, algos, piece_size, layer_files=not no_layers, progress=progress)
        progress.finish()
        warn_if_being_written(image)
        report_invented(image)
        replayed = log_replayed_in_memory(image)
    if _wants_json(ctx, as_json):
        render.emit_json({**result.to_json(), "log_replayed_in_memory": replayed})
        return
    for algo, digest in result.digests.items():
        click.echo(f"{algo}  {digest}  virtual disk of {render.printable(result.path)} ({result.virtual_size} bytes)")
    for i, piece in enumerate(result.pieces):
        offset = i * piece_size
        for algo, digest in piece.items():
            click.echo(f"piece {i} @ {offset:#x}: {algo}  {digest}")
    for layer in result.layers:
        for algo, digest in layer.digests.items():
            click.echo(f"layer {layer.depth} file: {algo}  {digest}  {render.printable(layer.path)} "
                       f"({layer.size} bytes)")
    if result.absent:
        click.echo(render.absent_summary(result.absent, "hashed as zeros"))


@click.command()
@click.argument("path", type=EXISTING_FILE)
@click.option("--extract", "extract_dir", type=click.Path(file_okay=False),
              help="Copy every non-zero run of slack into this folder (one file per run).")
@click.option("--all", "show_all", is_flag=True, help="Also list slack areas that hold only zeros.")
@chain_options
@_json_option
@click.pass_context
@handle_errors
def slack(ctx, path, extract_dir, show_all, as_json, **chain_opts):
    """Find space no structure references in PATH and its ancestors (only PATH with --orphan)."""
    with vhdx.open(path, **open_kwargs(**chain_opts)) as image:
        reports = find_chain_slack(image, extract_dir=extract_dir)
        warn_if_being_written(image)
        replayed = log_replayed_in_memory(image)
    if _wants_json(ctx, as_json):
        render.emit_json({"path": os.path.abspath(path), "path_given": path, "log_replayed_in_memory": replayed,
                          "layers": [r.to_json() for r in reports]})
        return
    for report in reports:
        click.echo(f"{report.path}: {render.human_size(report.slack_bytes)} of slack, "
                   f"{report.nonzero_bytes} non-zero bytes")
        for region in report.regions:
            if not region.nonzero and not show_all:
                continue
            click.echo(f"  {region.category:<14}{region.start:#012x} +{region.length:#x}  "
                       f"{render.printable(region.detail)}")
            for start, length in region.nonzero:
                click.echo(f"    non-zero {start:#012x} +{length:#x}")
        for name in report.extracted:
            click.echo(f"  extracted {render.printable(name)}")


@click.command()
@click.argument("chain", type=EXISTING_FILE)
@_layer_option
@click.option("--port", type=click.IntRange(1, 65535), help=f"TCP port on 127.0.0.1 (default {nbd.DEFAULT_PORT}).")
@click.option("--unix", "unix", type=click.Path(dir_okay=False), help="Serve on this Unix socket instead of TCP.")
@_partition_option
@chain_options
@salvage_option
@_json_option
@click.pass_context
@handle_errors
def serve(ctx, chain, at, port, unix, partition, as_json, salvage, **chain_opts):
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
    if _wants_json(ctx, as_json):
        render.emit_json({"path": os.path.abspath(chain), "path_given": chain, "uri": uri, "layer": depth,
                          "layer_path": os.path.abspath(layer_path),
                          "virtual_size": size, "read_only": True, "command": argv})
    else:
        click.echo(f"serving {render.printable(layer_path)} (layer {depth}, {size} bytes) read-only at {uri}; "
                   "Ctrl-C stops", err=True)
    sys.stdout.flush()
    code = nbd.run_server(argv, unix)
    if code:
        raise SystemExit(code)


@click.command()
@click.argument("chain", type=EXISTING_FILE)
@click.argument("mountpoint", type=click.Path(file_okay=False, exists=True))
@_layer_option
@_partition_option
@chain_options
@_json_option
@click.pass_context
@handle_errors
def mount(ctx, chain, mountpoint, at, partition, as_json, **chain_opts):
    """Expose the virtual disk (at any layer) as one read-only raw file under MOUNTPOINT (FUSE), until unmounted."""
    from vhdx.forensics.fuse import (
        load_fuse,  # noqa: PLC0415 - optional dependency
        raw_name,
    )
    from vhdx.forensics.fuse import mount as fuse_mount

    load_fuse()
    with vhdx.open(chain, **open_kwargs(**chain_opts)) as image:
        depth = find_layer(image, at)
        layer = image.layers[depth]
        warn_if_being_written(image)
        if partition is not None:
            layer = partition_view(layer, partition)

        def ready(file_path: str) -> None:
            if _wants_json(ctx, as_json):
                render.emit_json({"path": os.path.abspath(chain), "path_given": chain,
                                  "mountpoint": os.path.abspath(mountpoint), "file": file_path, "layer": depth,
                                  "layer_path": os.path.abspath(layer.path), "virtual_size": layer.virtual_size,
                                  "read_only": True})
            else:
                click.echo(f"{file_path}: layer {depth} ({render.printable(layer.path)}) read-only; unmount with "
                           f"'umount {mountpoint}'", err=True)
            sys.stdout.flush()

        name = f"{os.path.splitext(raw_name(layer.path))[0]}-p{partition}.raw" if partition is not None else None
        fuse_mount(layer, mountpoint, name=name, ready=ready)


COMMANDS = (diff, hash_, slack, serve, mount)
