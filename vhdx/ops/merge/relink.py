"""The parent locator changes a merge makes, through the shared locator rewrite of ``vhdx.ops.relink``.

Before the destination changes, the layer right above it accepts the destination's new DataWriteGuid
(parent_linkage2, product note <12>); after the data, the children of the merged child are pointed at the
destination; ``--abort`` gives the accepting layer its former parent_linkage2 back.

References: [MS-VHDX] §2.6.2.6.3 and product note <12> (parent_linkage2).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from vhdx.disk.image import VhdxImage, open_image
from vhdx.format import constants as c
from vhdx.format.guid import format_guid_text
from vhdx.io import ImageIO
from vhdx.ops.relink import plan_locator, rewrite_locator

Opener = Callable[[str], ImageIO]


def open_writable(path: str, opener: Opener) -> VhdxImage:
    # force: the merge weighed the disks that depend on this one itself (preflight).
    return open_image(opener(path), orphan=True, force=True)


def set_locator(path: str, opener: Opener, make_entries) -> None:
    """Rewrite the parent locator of ``path`` to ``make_entries(image, old_entries)`` (nothing when equal)."""
    with open_writable(path, opener) as image:
        old = list(image.params.parent_locator.entries)
        new = make_entries(image, old)
        if new != old:
            rewrite_locator(image, new)


def accept_new_guid(path: str, guid: uuid.UUID, opener: Opener) -> None:
    """Note <12>: the destination's child accepts the new DataWriteGuid (parent_linkage2) before it changes."""
    text = format_guid_text(guid)

    def entries(_image, old):
        if any(k == c.PARENT_LINKAGE2_KEY and v.lower() == text.lower() for k, v in old):
            return old
        return [(k, v) for k, v in old if k != c.PARENT_LINKAGE2_KEY] + [(c.PARENT_LINKAGE2_KEY, text)]

    set_locator(path, opener, entries)


def relink_child(path: str, destination: str, guid: uuid.UUID, opener: Opener) -> None:
    """Point a child of the merged child at the destination (linkage = its new DataWriteGuid, fresh paths)."""
    set_locator(path, opener, lambda _image, old: plan_locator(path, destination, old, guid))


def restore_linkage2(path: str, new_guid: uuid.UUID, previous: str | None, opener: Opener) -> None:
    """``--abort``: drop the parent_linkage2 the merge added, putting back ``previous`` (if there was one)."""
    new = format_guid_text(new_guid).lower()

    def entries(_image, old):
        if not any(k == c.PARENT_LINKAGE2_KEY and v.lower() == new for k, v in old):
            return old
        out = [(k, v) for k, v in old if k != c.PARENT_LINKAGE2_KEY]
        if previous:
            out.append((c.PARENT_LINKAGE2_KEY, previous))
        return out

    set_locator(path, opener, entries)
