"""Naming one layer of an opened chain: by depth (0 = the opened file) or by the path of its file."""

from __future__ import annotations

import os

from vhdx.disk.image import VhdxImage
from vhdx.errors import InvalidRequestError


def find_layer(image: VhdxImage, spec: str | int) -> int:
    """Depth of the layer ``spec`` names in ``image``'s chain: a depth number, or a path to one of its files."""
    layers = image.layers
    text = str(spec)
    if text.isdigit():
        depth = int(text)
        if depth >= len(layers):
            raise InvalidRequestError(f"layer {depth} does not exist (the chain has {len(layers)} layers, 0..."
                                      f"{len(layers) - 1})")
        return depth
    try:
        target = os.stat(text)
    except OSError as exc:
        raise InvalidRequestError(f"{text}: {exc.strerror}") from None
    for depth, layer in enumerate(layers):
        st = os.stat(layer.path)
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return depth
    raise InvalidRequestError(f"{text} is not a layer of the chain of {image.path}")
