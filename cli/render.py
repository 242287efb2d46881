"""Text and JSON rendering of library results (no format logic here)."""

from __future__ import annotations

import json
import os

import click

from vhdx.disk.extents import ExtentKind
from vhdx.disk.zero_runs import split_by_state
from vhdx.format.constants import BatState
from vhdx_cli.common import SCHEMA_VERSION, json_wanted
from vhdx_cli.text import printable, printable_lines  # noqa: F401  (renderers and commands use render.printable)


def emit_json(data) -> None:
    """Print a --json document; an object carries the schema_version its schema names (vhdx_cli.json_schemas)."""
    if isinstance(data, dict) and "schema_version" not in data:
        data = {"schema_version": SCHEMA_VERSION, **data}
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def report(data: dict, text: str) -> None:
    """The result of a command: DATA as JSON in --json mode, else TEXT."""
    emit_json(data) if json_wanted() else click.echo(text)


def with_absolute_path(data: dict, given: str) -> dict:
    """DATA with "path" absolute and "path_given" the name as typed (scripts join documents on the path)."""
    return {**data, "path": os.path.abspath(given), "path_given": given}


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"  # 32 MiB, 1.5 GiB
        n /= 1024
    return str(n)


def info_text(info) -> str:
    lines = [
        f"image: {info.path}",
        "file format: vhdx",
        f"disk type: {info.disk_type}",
        f"virtual size: {human_size(info.virtual_size)} ({info.virtual_size} bytes)",
        f"file size: {human_size(info.file_size)} ({info.file_size} bytes)",
        f"allocated: {human_size(info.allocated_bytes)} ({info.allocated_bytes} bytes)",
        f"block size: {human_size(info.block_size)} ({info.block_size} bytes)",
        f"logical sector size: {info.logical_sector_size}",
        f"physical sector size: {info.physical_sector_size}",
        f"disk id: {info.disk_id}",
        f"creator: {info.creator}",
        f"data write guid: {info.data_write_guid}",
        f"file write guid: {info.file_write_guid}",
    ]
    if info.writer_active:
        lines.append("note: another process holds the writer lock; the image may be changing")
    lines.append("headers:")
    current_seq = max((h.sequence_number for h in info.headers if h.current), default=None)
    for h in info.headers:
        mark = "current" if h.current else ("valid" if h.valid else f"INVALID: {h.problem}")
        if h.valid and not h.current and current_seq is not None and h.sequence_number < current_seq:
            mark += ", older copy (normal: header updates alternate between the two copies)"
        seq = f"seq {h.sequence_number}" if h.sequence_number is not None else ""
        lines.append(f"  header {h.slot} @ {h.offset:#x}: {mark} {seq}".rstrip())
    lines.append("region tables: " + ", ".join(
        f"{t['slot']} {'used' if t['used'] else ('valid' if t['valid'] else 'INVALID: ' + str(t['problem']))}"
        for t in info.region_tables))
    for r in info.regions:
        lines.append(f"  region {r['name']}: offset {r['file_offset']:#x} length {r['length']:#x}"
                     f"{' required' if r['required'] else ''}")
    lines.append("metadata items:")
    for m in info.metadata_items:
        flags = ",".join(f for f, on in (("user", m["is_user"]), ("virtual-disk", m["is_virtual_disk"]),
                                          ("required", m["is_required"])) if on)
        lines.append(f"  {m['name']}: offset {m['offset']:#x} length {m['length']} [{flags}]")
    bat = info.bat
    lines.append(f"BAT: offset {bat['file_offset']:#x}, {bat['entries']} entries, {bat['payload_blocks']} payload "
                 f"blocks, chunk ratio {bat['chunk_ratio']}, sector bitmaps present {bat['sector_bitmaps_present']}")
    for state, count in bat["state_counts"].items():
        lines.append(f"  {state}: {count}")
    log = info.log
    state = "dirty" if log["dirty"] else "empty"
    extra = f", {log['entries_to_replay']} entries to replay" if log["dirty"] else ""
    if log["replayed_in_memory"]:
        extra += " (replayed in memory for reading; file unchanged)"
    if log["problem"]:
        extra += f" ({log['problem']})"
    lines.append(f"log: offset {log['offset']:#x} length {log['length']:#x}, {state}{extra}")
    if info.parent_locator:
        lines.append(f"parent locator ({info.parent_locator['type']}):")
        for key, value in info.parent_locator["entries"].items():
            lines.append(f"  {key} = {value}")
    status = info.parent_status
    if status and status.get("orphan"):
        lines.append(f"read alone (--orphan): holds {status['held_bytes']} bytes, {status['absent_bytes']} bytes "
                     "absent (they would come from the parent; read as zeros)")
    elif status and status["found"]:
        link = "linkage ok" if status["linkage_ok"] else "linkage MISMATCH (accepted by --ignore-id-mismatch)"
        lines.append(f"parent: {status['path']} (found by {status['found_by']}, {link})")
    elif status:
        lines.append(f"parent: NOT AVAILABLE: {status['error']}")
    return printable_lines(lines)


def chain_text(chain) -> str:
    lines = []
    for layer in chain.layers:
        link = ""
        if layer.linkage_ok is not None:
            link = f"  [linkage {'ok' if layer.linkage_ok else 'MISMATCH (ignored)'}, found by {layer.found_by}]"
        lines.append(f"{layer.depth}: {layer.path}{link}")
        lines.append(f"   {layer.disk_type}, virtual {human_size(layer.virtual_size)}, file "
                     f"{human_size(layer.file_size)}, allocated {human_size(layer.allocated_bytes)}, block "
                     f"{human_size(layer.block_size)}, sector {layer.logical_sector_size}, seq "
                     f"{layer.sequence_number}, data write guid {layer.data_write_guid}")
    if chain.error:
        lines.append(f"chain broken: {chain.error}")
    return printable_lines(lines)


KIND_NAMES = {ExtentKind.DATA: "data", ExtentKind.ZERO: "zero", ExtentKind.ABSENT: "unallocated"}


# Zero-reading BAT states named apart in `map` (a trimmed block is not a zeroed one).
ZERO_STATE_NAMES = {BatState.ZERO: "zero", BatState.UNMAPPED: "unmapped", BatState.UNMAPPED_V095: "unmapped",
                    BatState.UNDEFINED: "undefined"}


def map_rows(extents, layer_paths: list[str], parent_missing: bool, layer_states=None) -> list[dict]:
    """Rows of `map`; LAYER_STATES (per layer: BAT states, block size) splits zero runs by their block state."""
    rows = []
    for start, length, kind, layer, file_offset in extents.rows():
        name = KIND_NAMES[ExtentKind(kind)]
        if kind == ExtentKind.ABSENT and parent_missing:
            name = "parent-missing"
        pieces = [(start, length, None)]
        if kind == ExtentKind.ZERO and layer_states is not None and layer >= 0:
            pieces = split_by_state(start, length, *layer_states[layer])
        for piece_start, piece_length, state in pieces:
            rows.append({
                "start": piece_start, "length": piece_length,
                "state": name if state is None else ZERO_STATE_NAMES.get(state, name),
                "layer": layer if layer >= 0 else None, "file": layer_paths[layer] if layer >= 0 else None,
                "offset": file_offset if kind == ExtentKind.DATA else None,
            })
    return rows


def map_text(rows: list[dict]) -> str:
    lines = [f"{'Offset':<18}{'Length':<18}{'State':<16}{'Mapped to':<18}{'Layer':<6}File"]
    for r in rows:
        mapped = f"{r['offset']:#x}" if r["offset"] is not None else "-"
        layer = str(r["layer"]) if r["layer"] is not None else "-"
        lines.append(f"{r['start']:<#18x}{r['length']:<#18x}{r['state']:<16}{mapped:<18}{layer:<6}{r['file'] or '-'}")
    return printable_lines(lines)


def absent_summary(absent, how: str) -> str:
    """One line for the ranges a lost parent would supply (hundreds on a real disk; --json lists each)."""
    total = sum(length for _, length in absent)
    first, (last_start, last_length) = absent[0][0], absent[-1]
    ranges = f"{len(absent)} range{'s' if len(absent) != 1 else ''}"
    return (f"absent (parent missing, {how}): {ranges}, {human_size(total)} ({total} bytes) between "
            f"{first:#x} and {last_start + last_length:#x}; --json lists each")
