"""The documented shape of every ``--json`` document, as JSON Schema (draft 2020-12), one per command.

Objects carry ``schema_version`` (``SCHEMA_VERSION``); it changes when a field changes meaning or goes away,
not when one is added (every object allows more properties). ``map`` keeps qemu-img's shape, a bare array.
An error in ``--json`` mode is the ``error`` document on stdout, with the command's usual exit code.
"""

from __future__ import annotations

from vhdx_cli.common import SCHEMA_VERSION

INT = {"type": "integer"}
UINT = {"type": "integer", "minimum": 0}
STR = {"type": "string"}
BOOL = {"type": "boolean"}
OPT_STR = {"type": ["string", "null"]}
OPT_UINT = {"type": ["integer", "null"], "minimum": 0}
ABS_PATH = {"type": "string", "pattern": "^/|^[A-Za-z]:[\\\\/]|^\\\\\\\\"}  # POSIX, drive letter or UNC
OPT_ABS_PATH = {"anyOf": [ABS_PATH, {"type": "null"}]}
GUID = {"type": "string", "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"}
VERSION = {"const": SCHEMA_VERSION}


def obj(required: dict, optional: dict | None = None) -> dict:
    """An object with these required properties (and maybe these optional ones); more are allowed."""
    return {"type": "object", "properties": {**required, **(optional or {})}, "required": sorted(required)}


def array(items: dict) -> dict:
    return {"type": "array", "items": items}


def document(required: dict, optional: dict | None = None) -> dict:
    """A top-level --json object: its fields plus schema_version."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            **obj({"schema_version": VERSION, **required}, optional)}


RANGE = obj({"start": UINT, "length": UINT})

ERROR = document({"error": obj({"message": STR, "exit_code": {"type": "integer", "minimum": 1}},
                               {"structure": OPT_STR, "offset": OPT_UINT, "path": OPT_STR})})

INFO = document({
    "path": ABS_PATH, "path_given": STR, "format": {"const": "vhdx"},
    "disk_type": {"enum": ["fixed", "dynamic", "differencing"]}, "virtual_size": UINT, "file_size": UINT,
    "block_size": UINT, "logical_sector_size": {"enum": [512, 4096]}, "physical_sector_size": {"enum": [512, 4096]},
    "disk_id": GUID, "has_parent": BOOL, "allocated_bytes": UINT, "data_write_guid": GUID, "file_write_guid": GUID,
    "headers": array(obj({"slot": INT, "offset": UINT, "valid": BOOL, "current": BOOL})),
    "region_tables": array(obj({"slot": INT, "offset": UINT, "valid": BOOL, "used": BOOL})),
    "regions": array(obj({"guid": GUID, "name": STR, "file_offset": UINT, "length": UINT, "required": BOOL})),
    "metadata_items": array(obj({"item_id": GUID, "name": STR, "offset": UINT, "length": UINT})),
    "bat": obj({"file_offset": UINT, "entries": UINT, "payload_blocks": UINT, "chunk_ratio": UINT,
                "state_counts": {"type": "object", "additionalProperties": UINT}}),
    "log": obj({"offset": UINT, "length": UINT, "dirty": BOOL, "replayed_in_memory": BOOL}),
}, {
    # A differencing disk: the locator's entries as stored, and where the parent resolved, side by side.
    "parent_locator": {"anyOf": [{"type": "null"}, obj({"type": GUID, "entries": {
        "type": "object", "additionalProperties": STR}})]},
    "parent_status": {"anyOf": [{"type": "null"}, obj({"found": BOOL}, {"path": OPT_ABS_PATH, "found_by": OPT_STR,
                                                                      "linkage_ok": {"type": ["boolean", "null"]}})]},
})

CHAIN = document({
    "layers": array(obj({"depth": UINT, "path": ABS_PATH, "disk_type": STR, "virtual_size": UINT,
                         "file_size": UINT, "block_size": UINT, "data_write_guid": GUID})),
    "error": OPT_STR,
})

MAP = {"$schema": "https://json-schema.org/draft/2020-12/schema", **array(obj({
    "start": UINT, "length": UINT,
    "state": {"enum": ["data", "zero", "unmapped", "undefined", "unallocated", "parent-missing"]},
    "layer": OPT_UINT, "file": OPT_ABS_PATH, "offset": OPT_UINT}))}

_CHECK_REPORT = obj({"path": STR, "checked": BOOL, "exit_code": {"enum": [0, 1, 2, 3]}, "leaked_bytes": UINT,
                     "findings": array(obj({"code": STR, "severity": STR, "message": STR}))})
CHECK = document({**_CHECK_REPORT["properties"], "path": ABS_PATH, "path_given": STR,
                  "parents": array(_CHECK_REPORT)})

HASH = document({
    "path": ABS_PATH, "virtual_size": UINT, "algorithms": array(STR),
    "digests": {"type": "object", "additionalProperties": STR}, "pieces": array({"type": "object"}),
    "layers": array({"type": "object"}), "orphan": BOOL, "absent": array(RANGE),
})

DIFF = document({
    "child": ABS_PATH, "ancestor": OPT_ABS_PATH, "layers": array(ABS_PATH),
    "granularity": {"enum": ["sector", "block"]}, "algorithm": STR, "virtual_size": UINT, "written_bytes": UINT,
    "orphan": BOOL,
    "extents": array(obj({"start": UINT, "length": UINT, "layers": array(UINT)})), "absent": array(RANGE),
})

COMPARE = document({
    "a": ABS_PATH, "b": ABS_PATH, "size_a": UINT, "size_b": UINT, "strict": BOOL, "identical": BOOL,
    "size_mismatch": BOOL, "first_mismatch": OPT_UINT, "extents": array(RANGE),
})

CREATE = document({"path": ABS_PATH, "path_given": STR, "disk_type": {"enum": ["fixed", "dynamic", "differencing"]},
                   "virtual_size": UINT, "block_size": UINT, "parent": OPT_ABS_PATH})
WRITE = document({"path": ABS_PATH, "path_given": STR, "offset": UINT, "length": UINT})
DISCARD = WRITE
CONVERT = document({"source": ABS_PATH, "destination": ABS_PATH, "destination_given": STR,
                    "source_format": {"enum": ["vhdx", "raw"]}, "output_format": {"enum": ["vhdx", "raw"]},
                    "destination_size": UINT})
FLATTEN = document({"child": ABS_PATH, "out": ABS_PATH, "out_given": STR, "data_bytes": UINT})

PARTITIONS = document({"path": ABS_PATH, "path_given": STR, "scheme": {"enum": ["mbr", "gpt", None]},
                       "partitions": array(obj({"number": {"type": "integer", "minimum": 1},
                                                "scheme": {"enum": ["mbr", "gpt"]}, "start": UINT, "length": UINT,
                                                "type": STR, "bootable": BOOL}, {"name": OPT_STR, "guid": OPT_STR}))})

# Command name -> schema of its --json output.
SCHEMAS = {"info": INFO, "chain": CHAIN, "map": MAP, "check": CHECK, "hash": HASH, "diff": DIFF,
           "compare": COMPARE, "create": CREATE, "write": WRITE, "discard": DISCARD, "convert": CONVERT,
           "flatten": FLATTEN, "partitions": PARTITIONS, "error": ERROR}
