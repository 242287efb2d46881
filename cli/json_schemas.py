"""The documented shape of every ``--json`` document, as JSON Schema (draft 2020-12), one per command.

Objects carry ``schema_version`` (``SCHEMA_VERSION``); it changes when a field changes meaning or goes away,
not when one is added (every object allows more properties). ``map`` too is an object (qemu-img's is a bare
array): its extents are under "extents". Every read command that opens a disk says whether a dirty log was
replayed in memory (``log_replayed_in_memory``; the file itself is left as it is).
An error in ``--json`` mode is the ``error`` document on stdout, with the command's usual exit code.
"""

from __future__ import annotations

from vhdx.ops.compact import MODES as COMPACT_MODES
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
                               {"structure": OPT_STR, "offset": OPT_UINT, "path": OPT_STR,
                                "code": OPT_STR})})

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

# qemu-img map prints a bare array; ours is an object like every other document (it can carry more fields).
MAP = document({"path": ABS_PATH, "path_given": STR, "extents": array(obj({
    "start": UINT, "length": UINT,
    "state": {"enum": ["data", "zero", "unmapped", "undefined", "unallocated", "parent-missing"]},
    "layer": OPT_UINT, "file": OPT_ABS_PATH, "offset": OPT_UINT}))})

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

SLACK = document({"path": ABS_PATH, "path_given": STR, "layers": array(obj({
    "path": ABS_PATH, "file_size": UINT, "slack_bytes": UINT, "nonzero_bytes": UINT, "extracted": array(STR),
    "regions": array(obj({"category": STR, "start": UINT, "length": UINT, "detail": STR, "nonzero_bytes": UINT,
                          "nonzero": array({})}))}))})

_CHECKED = obj({"path": STR, "checked": BOOL, "exit_code": {"enum": [0, 1, 2, 3]},
                "findings": array({"type": "object"})})
REPAIR = document({
    "path": ABS_PATH, "path_given": STR, "dry_run": BOOL, "backup": OPT_STR, "before": _CHECKED,
    "plan": obj({"actions": array(obj({"kind": STR, "description": STR, "codes": array(STR)})),
                 "refusals": array(obj({"code": STR, "reason": STR}))}),
    "changes": array({}), "after": {"anyOf": [{"type": "null"}, _CHECKED]}, "exit_code": {"enum": [0, 1, 2, 3]},
})

MERGE = document({
    "child": ABS_PATH, "child_given": STR, "destination": ABS_PATH, "merged": array(ABS_PATH), "dry_run": BOOL,
    "plan": obj({"bytes_to_copy": UINT, "virtual_size": UINT}), "relinked": array(ABS_PATH),
    "removed": array(ABS_PATH), "kept": array(ABS_PATH), "bytes_moved": UINT, "seconds": {"type": "number"},
    "mib_per_second": {"type": "number"}, "verified": {"type": ["boolean", "null"]}, "resumed": BOOL,
    "warnings": array(STR),
})
# merge --abort: what was rolled back, or what stays changed.
MERGE_ABORT = document({"child": ABS_PATH, "child_given": STR, "destination": ABS_PATH, "state": STR,
                        "rolled_back": BOOL, "remains": array(STR)})

SET_PARENT = document({
    "child": ABS_PATH, "child_given": STR, "parent": ABS_PATH, "parent_given": STR, "dry_run": BOOL,
    "linkage_matched": BOOL, "old": {"type": "object", "additionalProperties": STR},
    "new": {"type": "object", "additionalProperties": STR}, "removed": array(STR), "warnings": array(STR),
})

SERVE = document({"path": ABS_PATH, "path_given": STR, "uri": STR, "layer": UINT, "layer_path": ABS_PATH,
                  "virtual_size": UINT, "read_only": {"const": True}, "command": array(STR)})
MOUNT = document({"path": ABS_PATH, "path_given": STR, "mountpoint": ABS_PATH, "file": ABS_PATH, "layer": UINT,
                  "layer_path": ABS_PATH, "virtual_size": UINT, "read_only": {"const": True}})

RESIZE = document({"path": ABS_PATH, "path_given": STR, "dry_run": BOOL, "old_size": UINT, "new_size": UINT,
                   "file_size_before": UINT, "file_size_after": OPT_UINT, "data_bytes_cut": UINT,
                   "blocks_moved": UINT, "bat_relocated": BOOL, "gpt_backup_moved": BOOL, "warnings": array(STR)})
COMPACT = document({"path": ABS_PATH, "path_given": STR, "mode": {"enum": list(COMPACT_MODES)},
                    "dry_run": BOOL, "file_size_before": UINT, "file_size_after": OPT_UINT,
                    "zero_blocks_released": UINT, "trimmed_blocks_released": UINT, "blocks_moved": UINT,
                    "block_size": UINT, "warnings": array(STR), "bytes_released": OPT_UINT})

_VM = obj({"name": STR, "id": STR, "config": ABS_PATH, "generation": INT,
           "drives": array(obj({"slot": STR, "path": OPT_STR, "local": OPT_ABS_PATH}))})
VM_SHOW = document({"root": ABS_PATH, "vms": array(_VM), "chains": {"type": "object"},
                    "unreadable": array(obj({"path": ABS_PATH, "error": STR}))})
VM_AUDIT = document({"root": ABS_PATH, "vms": array(_VM)})

SCAN = document({"schema": {"const": "vhdx-scan"}, "roots": array(ABS_PATH), "disks": array(obj({
    "path": ABS_PATH, "type": OPT_STR, "virtual_size": OPT_UINT, "file_size": OPT_UINT, "parent": OPT_ABS_PATH,
    "parent_status": STR, "dirty_log": {"type": ["boolean", "null"]}, "error": OPT_STR}))})

# hyperv: paths are the host's (Windows) paths, as Hyper-V reports them.
_HV_VM = obj({"name": STR, "id": STR, "state": STR, "path": STR, "disks": array(obj({"path": STR}))})
HYPERV_VMS = document({"vms": array(_HV_VM)})
HYPERV_CHECKPOINTS = document({"vm": _HV_VM, "checkpoints": array(obj({"id": STR, "name": STR, "kind": STR}))})
HYPERV_AUDIT = document({"vm": _HV_VM, "disks": array({"type": "object"}), "steps": array({"type": "object"}),
                         "lingering_bytes": UINT})

HYPERV_INFO = document({"path": STR, "format": STR, "disk_type": STR, "virtual_size": UINT, "file_size": UINT,
                        "block_size": UINT, "parent_path": OPT_STR})
HYPERV_MERGE = document({"source": STR, "source_still_exists": BOOL,
                         "destination": obj({"path": STR, "disk_type": STR, "virtual_size": UINT})})
HYPERV_CHECK = document({"path": STR, "passed": BOOL, "problems": array(obj({"message": STR}))})
HYPERV_REMOVE_CHECKPOINT = document({"job": obj({"vm": STR, "removed": array(STR), "expect_gone": array(STR)}),
                                     "outcome": {"anyOf": [{"type": "null"}, obj({"vm": STR, "merged": array(STR)})]}})
# hyperv merge/remove-checkpoint --dry-run: the script and the parameters it would be sent.
HYPERV_PLAN = document({"dry_run": {"const": True}, "script": STR, "parameters": {"type": "object"}, "text": STR})

VM_TREE = document({"png": ABS_PATH, "png_given": STR, "dot": OPT_ABS_PATH, "boxes": UINT, "engine": STR})

BENCH = document({"folder": ABS_PATH, "virtual_size": UINT, "rows": array(obj({"operation": STR, "status": STR}))})

FIXTURE_LIST = document({"specs": array(obj({"name": STR, "description": STR, "layers": array(STR),
                                              "faults": array(STR)})),
                         "faults": array(obj({"name": STR, "summary": STR, "codes": array(STR)}))})
# The manifest names the built files relative to the output folder (it travels with the folder).
FIXTURE_BUILD = {**document({"outdir": ABS_PATH, "outdir_given": STR}), "anyOf": [
    obj({"name": STR, "layers": array(obj({"name": STR, "path": STR, "sha256": STR}))}),  # a chain
    obj({"spec": STR, "vm": obj({"name": STR, "id": STR})}),  # a Hyper-V VM folder
]}


def _with_replay_flag(schema: dict) -> dict:
    return {**schema, "properties": {**schema["properties"], "log_replayed_in_memory": BOOL},
            "required": sorted({*schema["required"], "log_replayed_in_memory"})}


INFO, CHAIN, MAP, CHECK, HASH, DIFF, SLACK, CONVERT, FLATTEN, COMPARE, PARTITIONS = map(
    _with_replay_flag, (INFO, CHAIN, MAP, CHECK, HASH, DIFF, SLACK, CONVERT, FLATTEN, COMPARE, PARTITIONS))

# Command name (subcommands after a space) -> schema of its --json output.
SCHEMAS = {"info": INFO, "chain": CHAIN, "map": MAP, "check": CHECK, "hash": HASH, "diff": DIFF,
           "compare": COMPARE, "create": CREATE, "write": WRITE, "discard": DISCARD, "convert": CONVERT,
           "flatten": FLATTEN, "partitions": PARTITIONS, "slack": SLACK, "repair": REPAIR, "merge": MERGE,
           "merge --dry-run": MERGE,
           "merge --abort": MERGE_ABORT, "set-parent": SET_PARENT, "serve": SERVE, "mount": MOUNT,
           "resize": RESIZE, "compact": COMPACT, "vm show": VM_SHOW, "vm audit": VM_AUDIT, "scan": SCAN,
           "hyperv vms": HYPERV_VMS, "hyperv checkpoints": HYPERV_CHECKPOINTS, "hyperv audit": HYPERV_AUDIT,
           "hyperv info": HYPERV_INFO, "hyperv check": HYPERV_CHECK,
           "hyperv remove-checkpoint": HYPERV_REMOVE_CHECKPOINT,
           "hyperv merge": HYPERV_MERGE, "hyperv merge --dry-run": HYPERV_PLAN,
           "hyperv remove-checkpoint --dry-run": HYPERV_PLAN,
           "vm tree": VM_TREE, "bench": BENCH,
           "fixture list": FIXTURE_LIST, "fixture build": FIXTURE_BUILD, "error": ERROR}
