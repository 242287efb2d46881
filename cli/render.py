"""Text and JSON rendering of library results (no format logic here)."""

from __future__ import annotations

import os
import sys

import click

from vhdx.disk.extents import ExtentKind
from vhdx.disk.zero_runs import split_by_state
from vhdx.format.constants import BatState
from vhdx_cli.common import SCHEMA_VERSION, current_state, json_wanted
from vhdx_cli.text import printable, printable_lines  # renderers and commands use render.printable


def emit_json(data) -> None:
    """Print a --json document; an object carries the schema_version its schema names (vhdx_cli.json_schemas)."""
    if isinstance(data, dict) and "schema_version" not in data:
        data = {"schema_version": SCHEMA_VERSION, **data}
    import json  # noqa: PLC0415 - only --json output needs it (start-up cost)

    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def report(data: dict, text) -> None:
    """The result of a command: DATA as JSON in --json mode, else TEXT (a string, or a function that makes it)."""
    if json_wanted():
        emit_json(data)
    else:
        echo_text(text() if callable(text) else text)


def echo_text(text: str) -> None:
    """TEXT on stdout in pieces of lines: a reader that has gone (``| head -1``) shows as BrokenPipeError at once.

    (One very large write into a closed pipe can end as a short write that nothing reports.)
    """
    lines = text.split("\n")
    for start in range(0, len(lines), ECHO_LINES):
        click.echo("\n".join(lines[start:start + ECHO_LINES]))


ECHO_LINES = 256


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


# -- read commands (info, chain, map) ---------------------------------------------------------------------------


def info(described, given: str, replayed: bool) -> None:
    report({**with_absolute_path(described.to_json(), given), "log_replayed_in_memory": replayed},
           info_text(described))


def chain(described, replayed: bool) -> None:
    report({**described.to_json(), "log_replayed_in_memory": replayed}, chain_text(described))


def map_(rows: list[dict], given: str, replayed: bool) -> None:
    # An object like every other command's (qemu-img map prints a bare array).
    report({**with_absolute_path({}, given), "log_replayed_in_memory": replayed, "extents": rows}, map_text(rows))


def converted(source: str, destination: str, source_format: str, output_format: str, replayed: bool) -> None:
    """What convert wrote (--json only: in text it prints nothing, as qemu-img does)."""
    if json_wanted():
            emit_json({"source": os.path.abspath(source), "destination": os.path.abspath(destination),
                   "destination_given": destination, "source_format": source_format,
                   "output_format": output_format, "destination_size": os.path.getsize(destination),
                   "log_replayed_in_memory": replayed})


# -- forensics (diff, hash, slack, serve, mount) ----------------------------------------------------------------


def diff(result, algorithm: str, replayed: bool) -> None:
    def text() -> str:
        lines = [f"child: {result.child}", f"against: {result.ancestor or '(nothing: orphan or base disk)'}",
                 f"{len(result.extents)} extents, {human_size(result.written_bytes)} written "
                 f"({result.granularity} granularity)",
                 f"{'Offset':<18}{'Length':<14}{'Layers':<8}new {algorithm} / old {algorithm}"]
        for e in result.extents:
            lines.append(f"{e.start:<#18x}{e.length:<#14x}{','.join(map(str, e.layers)):<8}{e.new_digest}")
            lines.append(f"{'':<40}{e.old_digest or '-'}")
        if result.absent:
            lines.append(absent_summary(result.absent, "reads as zeros"))
        return printable_lines(lines)

    report({**result.to_json(), "log_replayed_in_memory": replayed}, text)


def hashed(result, piece_size: int | None, replayed: bool) -> None:
    def text() -> str:
        lines = [f"{algo}  {digest}  virtual disk of {result.path} ({result.virtual_size} bytes)"
                 for algo, digest in result.digests.items()]
        for i, piece in enumerate(result.pieces):
            lines += [f"piece {i} @ {i * piece_size:#x}: {algo}  {digest}" for algo, digest in piece.items()]
        for layer in result.layers:
            lines += [f"layer {layer.depth} file: {algo}  {digest}  {layer.path} ({layer.size} bytes)"
                      for algo, digest in layer.digests.items()]
        if result.absent:
            lines.append(absent_summary(result.absent, "hashed as zeros"))
        return printable_lines(lines)

    report({**result.to_json(), "log_replayed_in_memory": replayed}, text)


def hashed_partition(path: str, part, digests: dict) -> None:
    report({"path": os.path.abspath(path), "partition": part.to_json(), "digests": digests},
           lambda: printable_lines(f"{algo}  {digest}  partition {part.number} of {path} ({part.length} bytes at "
                                   f"{part.start})" for algo, digest in digests.items()))


def slack(reports, given: str, show_all: bool, replayed: bool) -> None:
    def text() -> str:
        lines = []
        for found in reports:
            lines.append(f"{found.path}: {human_size(found.slack_bytes)} of slack, "
                         f"{found.nonzero_bytes} non-zero bytes")
            for region in found.regions:
                if not region.nonzero and not show_all:
                    continue
                lines.append(f"  {region.category:<14}{region.start:#012x} +{region.length:#x}  {region.detail}")
                lines += [f"    non-zero {start:#012x} +{length:#x}" for start, length in region.nonzero]
            lines += [f"  extracted {name}" for name in found.extracted]
        return printable_lines(lines)

    report({**with_absolute_path({}, given), "log_replayed_in_memory": replayed,
            "layers": [r.to_json() for r in reports]}, text)


def serving(given: str, uri: str, depth: int, layer_path: str, size: int, argv: list[str]) -> None:
    """What `serve` exports (JSON on stdout, or a line on stderr: stdout stays free), before nbdkit takes over."""
    if json_wanted():
        emit_json({**with_absolute_path({}, given), "uri": uri, "layer": depth,
                   "layer_path": os.path.abspath(layer_path), "virtual_size": size, "read_only": True,
                   "command": argv})
    else:
        click.echo(f"serving {printable(layer_path)} (layer {depth}, {size} bytes) read-only at {uri}; Ctrl-C stops",
                   err=True)
    sys.stdout.flush()


def mounted(given: str, mountpoint: str, file_path: str, depth: int, layer) -> None:
    """What `mount` exposes, once FUSE serves it."""
    if json_wanted():
        emit_json({**with_absolute_path({}, given), "mountpoint": os.path.abspath(mountpoint), "file": file_path,
                   "layer": depth, "layer_path": os.path.abspath(layer.path), "virtual_size": layer.virtual_size,
                   "read_only": True})
    else:
        click.echo(f"{file_path}: layer {depth} ({printable(layer.path)}) read-only; unmount with "
                   f"'umount {mountpoint}'", err=True)
    sys.stdout.flush()


def partitions(found, given: str, replayed: bool) -> None:
    def text() -> str:
        if not found:
            return printable(f"{given}: no MBR or GPT partition table")
        lines = [f"{'#':<4}{'Start':<16}{'Length':<16}{'Size':<12}{'Type':<40}Name"]
        for p in found:
            name = p.name or ("boot" if p.bootable else "")
            lines.append(f"{p.number:<4}{p.start:<#16x}{p.length:<#16x}{human_size(p.length):<12}{p.type:<40}{name}")
        return printable_lines(lines)

    report({**with_absolute_path({}, given), "log_replayed_in_memory": replayed,
            "scheme": found[0].scheme if found else None, "partitions": [p.to_json() for p in found]}, text)


# -- merge and flatten ------------------------------------------------------------------------------------------


def abort_text(done) -> str:
    if done.rolled_back:
        return f"rolled back the merge of {done.child} into {done.destination}: every file is as before the merge"
    lines = [f"gave up the merge of {done.child} into {done.destination} (it had reached step '{done.state}'; "
             "past the point of no return, so not rolled back); what stays:"]
    lines.extend(f"  {sentence}" for sentence in done.remains)
    return "\n".join(lines)


def merge_text(result) -> str:
    plan = result.plan
    lines = []
    for warning in result.warnings:
        lines.append(f"warning: {warning}")
    head = "would merge" if result.dry_run else ("resumed merge of" if result.resumed else "merged")
    lines.append(f"{head} {' + '.join(result.merged)} into {result.destination}")
    if plan is not None:
        lines.append(f"  blocks touched: {plan['blocks_touched']} of {result.destination}")
        lines.append(f"  bytes to copy: {human_size(plan['bytes_to_copy'])} in {plan['copy_runs']} run(s); "
                     f"bytes to zero: {human_size(plan['bytes_to_zero'])}")
        lines.append(f"  new allocations: {plan['new_blocks']} block(s), {plan['new_sector_bitmaps']} sector "
                     f"bitmap(s), {plan['reused_blocks']} block(s) reusing kept space")
        if result.dry_run:
            lines.append(f"  destination file size: {human_size(plan['file_size'])} -> "
                         f"{human_size(plan['final_size_estimate'])} (estimate)")
        elif os.path.exists(result.destination):  # after the fact: what the file measures now
            lines.append(f"  destination file size: {human_size(plan['file_size'])} -> "
                         f"{human_size(os.path.getsize(result.destination))}")
        lines.append(f"  plan digest: {plan['digest']}")
    if result.relinked:
        lines.append(("  would relink: " if result.dry_run else "  relinked: ") + ", ".join(result.relinked))
    if result.dry_run:
        lines.append("dry run: nothing was changed")
        return "\n".join(lines)
    if result.removed:
        lines.append("  deleted: " + ", ".join(result.removed))
    if result.kept:
        lines.append("  kept as: " + ", ".join(result.kept))
    if result.verified:
        lines.append("  verified: the merged disk reads what the chain read, block for block")
    lines.append(f"moved {human_size(result.bytes_moved)} in {result.seconds:.2f} s "
                 f"({result.mib_per_second:,.1f} MiB/s)")
    return "\n".join(lines)


def merge_aborted(done, given: str) -> None:
    report({**done.to_json(), "child_given": given}, lambda: printable_lines(abort_text(done).split("\n")))


def merged(result, given: str) -> None:
    report({**result.to_json(), "child_given": given}, lambda: printable_lines(merge_text(result).split("\n")))


def flattened(child: str, out: str, written: int, replayed: bool) -> None:
    report({"child": os.path.abspath(child), "out": os.path.abspath(out), "out_given": out, "data_bytes": written,
            "log_replayed_in_memory": replayed},
           lambda: printable(f"flattened {child} into {out} ({human_size(written)} of data)"))


# -- check and repair -------------------------------------------------------------------------------------------


def report_lines(report, indent: str = "") -> list[str]:
    """Text of a check report: one line per finding, then a verdict (with each parent's under it)."""
    lines = [f"{indent}{report.path}:"]
    if not report.checked:
        lines.append(f"{indent}  could not check: {report.error}")
    for f in report.findings:
        if f.severity.value == "info":
            continue  # normal states (an older header copy): `vhdx info` shows them, --json lists them
        where = "" if f.offset is None else f" @ {f.offset:#x}"
        fix = " [repairable]" if f.repairable else ""
        lines.append(f"{indent}  {f.severity.value:<7} {f.code} {f.structure}{where}: {f.message}{fix}")
    if report.checked:
        errors = sum(1 for f in report.findings if f.severity.value == "error")
        leaks = sum(1 for f in report.findings if f.severity.value == "leak")
        if errors:
            lines.append(f"{indent}  {errors} error(s) found")
        elif leaks:
            lines.append(f"{indent}  no corruption; {report.leaked_bytes} leaked bytes")
        else:
            lines.append(f"{indent}  no errors were found")
        if report.free_bytes:
            lines.append(f"{indent}  {report.free_bytes} bytes of free space between structures (not a leak; "
                         "reclaimable by compaction, e.g. vhdx convert)")
    for parent in report.parents:
        lines.extend(report_lines(parent, indent + "  "))
    return lines


def checked(report_, given: str, replayed: bool) -> None:
    report({**with_absolute_path(report_.to_json(), given), "log_replayed_in_memory": replayed},
           lambda: printable_lines(report_lines(report_)))


def repaired(result, given: str) -> None:
    report(with_absolute_path(result.to_json(), given), lambda: printable_lines(repair_lines(result)))


def repair_lines(result) -> list[str]:
    lines = []
    if result.backup:
        lines.append(f"backup: {result.backup}")
    verb = "would" if result.dry_run else "will"
    if not result.plan.actions:
        lines.append("nothing to repair")
    for action in result.plan.actions:
        lines.append(f"{verb}: {action.description}")
    for refusal in result.plan.refusals:
        where = "" if refusal.offset is None else f" @ {refusal.offset:#x}"
        lines.append(f"refused: {refusal.code} {refusal.structure}{where}: {refusal.reason}")
    for change in result.changes:
        lines.append(f"changed: {change}")
    if result.after is not None and not result.dry_run and result.plan.actions:
        lines.append("after repair:")
        lines.extend(report_lines(result.after, "  "))
    return lines


# -- create, write, discard, set-parent -------------------------------------------------------------------------


def created(image, given: str, parent: str | None) -> None:
    report({**with_absolute_path({}, given), "disk_type": image.disk_type.label, "virtual_size": image.virtual_size,
            "block_size": image.block_size, "parent": os.path.abspath(parent) if parent else None},
           lambda: printable(f"created {given}"))


def written(given: str, offset: int, length: int) -> None:
    report({**with_absolute_path({}, given), "offset": offset, "length": length},
           f"wrote {length} bytes at offset {offset}")


def discarded(given: str, offset: int, length: int, done: int, fixed: bool, block_size: int) -> None:
    if fixed:
        why = " (a fixed disk keeps its blocks allocated; nothing changed)"
    elif not done:
        why = f" (no whole block ({block_size} bytes) in the range was still mapped; nothing changed)"
    elif done < length:
        why = f" (whole blocks only; parts of the {length}-byte range in partial blocks are left as they are)"
    else:
        why = ""
    report({**with_absolute_path({}, given), "offset": offset, "length": length, "discarded_bytes": done},
           f"discarded {done} bytes at offset {offset}{why}")


def relinked(result, child: str, parent: str, dry_run: bool) -> None:
    """`set-parent`: the locator entries before and after (warnings on stderr unless -q)."""
    if not current_state().quiet:
        for warning in result.warnings:
            click.echo(f"vhdx: warning: {printable(warning)}", err=True)
    old_entries, new = dict(result.old_entries), dict(result.new_entries)
    removed = [key for key in old_entries if key not in new]

    def text() -> str:
        lines = [("would change" if dry_run else "changed") + f" parent locator of {child}:"]
        for key, value in result.new_entries:
            old = old_entries.get(key)
            lines.append(f"  {key}: {old} -> {value}" if old != value else f"  {key}: {value} (unchanged)")
        lines += [f"  {key}: {old_entries[key]} -> (removed)" for key in removed]
        return printable_lines(lines)

    report({"child": os.path.abspath(child), "child_given": child, "parent": os.path.abspath(parent),
            "parent_given": parent, "dry_run": dry_run, "linkage_matched": result.linkage_matched,
            "old": old_entries, "new": new, "removed": removed, "warnings": list(result.warnings)}, text)


# -- resize and compact -----------------------------------------------------------------------------------------


def _size_or_unknown(n: int | None) -> str:
    return "?" if n is None else human_size(n)


def _warn(warnings) -> None:
    for warning in warnings:
        click.echo(f"vhdx: warning: {printable(warning)}", err=True)


def resize_starting(given: str, size: int | None, to_minimum: bool, dry_run: bool) -> None:
    if not json_wanted():
        target = "the end of its last partition" if to_minimum else f"{size} bytes"
        click.echo(printable(f"{'would resize' if dry_run else 'resizing'} {given} to {target}"))


def resized(result, given: str, dry_run: bool) -> None:
    if json_wanted():
        emit_json({**with_absolute_path(result.to_json(), given), "dry_run": dry_run})
        return
    _warn(result.warnings)
    click.echo(f"{'would change' if dry_run else 'changed'} virtual size {result.old_size} -> {result.new_size} bytes")
    if not dry_run:
        click.echo(f"file size {_size_or_unknown(result.file_size_before)} -> "
                   f"{_size_or_unknown(result.file_size_after)}; {result.blocks_moved} blocks moved"
                   + ("; BAT moved to the end of the file" if result.bat_relocated else "")
                   + ("; GPT backup copy moved to the new end" if result.gpt_backup_moved else ""))


def compact_starting(given: str, mode: str, dry_run: bool, resume: bool) -> None:
    if not json_wanted():
        verb, what = ("would compact" if dry_run else "compacting"), ("resumed" if resume else mode)
        click.echo(printable(f"{verb} {given} ({what})"))


def compacted(result, given: str, dry_run: bool) -> None:
    if json_wanted():
        emit_json(with_absolute_path(result.to_json(), given))
        return
    _warn(result.warnings)
    bs, verb, size = result.block_size, "would release" if dry_run else "released", _size_or_unknown
    lines = []
    if result.mode == "quick":
        lines.append("guest: " + "\n  ".join(result.guest))
        lines.append(f"{verb} {result.free_blocks_released} blocks holding only free guest clusters "
                     f"({size(result.free_blocks_released * bs)})")
    lines.append(f"{verb} {result.zero_blocks_released} zero blocks and the space of "
                 f"{result.trimmed_blocks_released} trimmed blocks "
                 f"({size((result.zero_blocks_released + result.trimmed_blocks_released) * bs)})")
    if result.kept_over_parent_data or result.kept_partial:
        lines.append(f"kept {result.kept_over_parent_data} zero blocks that hide parent data and "
                     f"{result.kept_partial} partially present blocks (not reclaimable in a chain)")
    if not dry_run:
        lines.append(f"file size {size(result.file_size_before)} -> {size(result.file_size_after)} "
                     f"({size(result.bytes_released)} released); {result.blocks_moved} blocks moved")
    click.echo("\n".join(lines))


def compared(result, replayed: bool) -> None:
    """`compare`, in qemu-img compare's words (--json: every differing extent)."""
    if result.size_mismatch:
        text = f"Strict mode: image size mismatch ({result.size_a} and {result.size_b} bytes)"
    else:
        text = "Images are identical." if result.identical else f"Content mismatch at offset {result.first_mismatch}!"
    report({**result.to_json(), "log_replayed_in_memory": replayed}, text)
