"""What ``vhdx chain`` shows: each layer from a file down to its base disk (data classes that serialise to JSON).

References: [MS-VHDX] §2.6.2.6 (parent locator and linkage), §2.2.2 (DataWriteGuid).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vhdx.errors import VhdxError

if TYPE_CHECKING:
    from vhdx.disk.image import VhdxImage


@dataclass
class LayerInfo:
    """One layer of a chain, with what a timeline of checkpoints needs."""

    depth: int
    path: str
    disk_type: str
    virtual_size: int
    file_size: int
    allocated_bytes: int
    block_size: int
    logical_sector_size: int
    creator: str
    sequence_number: int
    data_write_guid: str
    file_write_guid: str
    disk_id: str
    modified_time: float
    linkage: list[str] = field(default_factory=list)
    found_by: str | None = None  # locator entry that led from the child to this layer
    linkage_ok: bool | None = None  # the child's linkage matches this layer's DataWriteGuid


@dataclass
class ChainInfo:
    """Every layer from the opened file down to its base disk, and why the walk stopped early."""

    layers: list[LayerInfo]
    error: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def describe_chain(image: VhdxImage) -> ChainInfo:
    """Walk from ``image`` to the base; stop with ``error`` set where a parent cannot be opened."""
    layers: list[LayerInfo] = []
    current, child = image, None
    while current is not None:
        locator = current.params.parent_locator
        layers.append(LayerInfo(
            depth=len(layers), path=os.path.abspath(current.path), disk_type=current.disk_type.label,
            virtual_size=current.virtual_size, file_size=current.io.real_size,
            allocated_bytes=current.allocated_bytes, block_size=current.block_size,
            logical_sector_size=current.logical_sector_size, creator=current.creator,
            sequence_number=current.headers.current.sequence_number,
            data_write_guid=str(current.data_write_guid), file_write_guid=str(current.file_write_guid),
            disk_id=str(current.disk_id), modified_time=os.stat(current.path).st_mtime if os.path.exists(
                current.path) else 0.0,
            linkage=[str(g) for g in locator.linkages] if locator else [],
            found_by=child.parent_source if child else None,
            linkage_ok=(current.data_write_guid in child.params.parent_locator.linkages) if child else None,
        ))
        try:
            child, current = current, current.parent
        except VhdxError as exc:
            return ChainInfo(layers, error=str(exc))
    return ChainInfo(layers)
