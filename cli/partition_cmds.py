"""`vhdx partitions PATH`: the MBR/GPT partitions of the virtual disk (like `fdisk -l` on the flat image)."""

from __future__ import annotations

import click

from vhdx.forensics.hashing import MultiHasher, check_algorithms, feed, image_pieces
from vhdx.ops.partitions import image_partitions, select
from vhdx_cli import render
from vhdx_cli.common import handle_errors
from vhdx_cli.options import EXISTING_FILE, chain_options, json_option, reading


@click.command()
@click.argument("path", type=EXISTING_FILE)
@chain_options
@json_option
@handle_errors
def partitions(path, **chain_opts):
    """List the MBR or GPT partitions of the virtual disk of PATH (read through its chain)."""
    with reading(path, chain_opts) as opened:
        found = image_partitions(opened.image)
    render.partitions(found, path, opened.replayed)


def hash_partition(image, number: int, algorithms: str) -> None:
    """`hash --partition N`: the digests of one partition's bytes (= of `dd` of that partition)."""
    algos = check_algorithms(algorithms.split(","))
    part = select(image_partitions(image), number)
    sink = MultiHasher(algos)
    feed(image_pieces(image, part.start, part.start + part.length), sink)
    render.hashed_partition(image.path, part, sink.finish())
