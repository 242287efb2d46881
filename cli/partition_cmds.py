"""`vhdx partitions PATH`: the MBR/GPT partitions of the virtual disk (like `fdisk -l` on the flat image)."""

from __future__ import annotations

import os

import click

import vhdx
from vhdx.forensics.hashing import MultiHasher, check_algorithms, feed, image_pieces
from vhdx.ops.partitions import image_partitions, select
from vhdx_cli import render
from vhdx_cli.common import (
    chain_options,
    handle_errors,
    json_wanted,
    log_replayed_in_memory,
    open_kwargs,
    warn_if_being_written,
)


@click.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@chain_options
@handle_errors
def partitions(path, **chain_opts):
    """List the MBR or GPT partitions of the virtual disk of PATH (read through its chain)."""
    with vhdx.open(path, **open_kwargs(**chain_opts)) as image:
        found = image_partitions(image)
        warn_if_being_written(image)
        replayed = log_replayed_in_memory(image)
    data = {"path": os.path.abspath(path), "path_given": path, "log_replayed_in_memory": replayed,
            "scheme": found[0].scheme if found else None,
            "partitions": [p.to_json() for p in found]}
    lines = [f"{'#':<4}{'Start':<16}{'Length':<16}{'Size':<12}{'Type':<40}Name"]
    for p in found:
        name = p.name or ("boot" if p.bootable else "")
        lines.append(f"{p.number:<4}{p.start:<#16x}{p.length:<#16x}{render.human_size(p.length):<12}{p.type:<40}{name}")
    render.report(data, "\n".join(lines) if found else f"{path}: no MBR or GPT partition table")


def hash_partition(image, number: int, algorithms: str) -> None:
    """`hash --partition N`: the digests of one partition's bytes (= of `dd` of that partition)."""
    algos = check_algorithms(algorithms.split(","))
    part = select(image_partitions(image), number)
    sink = MultiHasher(algos)
    feed(image_pieces(image, part.start, part.start + part.length), sink)
    digests = sink.finish()
    data = {"path": os.path.abspath(image.path), "partition": part.to_json(), "digests": digests}
    if json_wanted():
        render.emit_json(data)
        return
    for algo, digest in digests.items():
        click.echo(f"{algo}  {digest}  partition {part.number} of {image.path} ({part.length} bytes at {part.start})")
