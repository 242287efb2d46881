"""`vhdx vm`: Hyper-V VM folders read offline (configurations, checkpoint tree, disks, audit and clean-up plan)."""

from __future__ import annotations

import os

import click

from vhdx_cli import render
from vhdx_cli.common import handle_errors, json_wanted
from vhdx_cli.options import EXISTING_PATH, NEW_FILE, force_option, vm_folder_options


@click.group()
def vm():
    """Read Hyper-V VM folders offline: which file is which checkpoint, orphans, missing disks, clean-up plan."""


@vm.command()
@click.argument("path", type=EXISTING_PATH)
@vm_folder_options("disks the configuration names")
@handle_errors
def show(path, search_dirs):
    """Show the VM at PATH (a VM folder or a .vmcx/.xml file): generation, drives and the checkpoint tree."""
    # Late: a command module imports its heavy parts only in the command that runs (start-up, issue 15 item 2).
    from vhdx.hyperv.config import read_config  # noqa: PLC0415
    from vhdx.hyperv.vm import host_inventory, load_folder  # noqa: PLC0415

    config = read_config(path) if os.path.isfile(path) else None
    if config is not None and path.lower().endswith(".vmrs"):
        runtime_state(config)  # saved memory and device state of a VM or checkpoint: no drives, no name
        return
    inventory = host_inventory(config) if config is not None else None
    if inventory is not None:
        host_registrations(path, inventory)
        return
    folder_vms(load_folder(path, search_dirs))


def _count_keys(node) -> int:
    return sum(1 + _count_keys(v) for v in node.values()) if isinstance(node, dict) else 0


# -- rendering (text and JSON) ------------------------------------------------------------------------------


def runtime_state(config) -> None:
    summary = {"runtime_state": config.path, "keys": _count_keys(config.root),
               "replayed_log_entries": config.replayed_entries, "top": sorted(config.root)}
    render.report(summary, lambda: render.printable(
        f"runtime state file {config.path}: {summary['keys']} keys under {', '.join(summary['top'])} (a VM's saved "
        "state; its configuration is the .vmcx of the same name)"))


def host_registrations(path: str, inventory) -> None:
    render.report({"host_inventory": [{"id": i, "config": p} for i, p in inventory]},
                  lambda: render.printable_lines([f"host inventory {path}: {len(inventory)} registered VM(s)",
                                                  *(f"  {i}  {p}" for i, p in inventory)]))


def folder_vms(folder) -> None:
    from vhdx.hyperv.vm import layer_owners  # noqa: PLC0415 - start-up (issue 15 item 2)

    # Names, notes and paths come from the configuration files: escaped like every other text from a file.
    render.report({"root": folder.root, "vms": [{**v.to_json(), "layer_owners": layer_owners(v)} for v in folder.vms],
                   "chains": {p: vars(c) for p, c in folder.chains.items()},
                   "unreadable": [{"path": p, "error": e} for p, e in folder.unreadable]},
                  lambda: "\n\n".join(render.printable_lines(vm_text(v, folder).split("\n")) for v in folder.vms))
    if not json_wanted():
        for p, error in folder.unreadable:
            click.echo(render.printable(f"warning: {p}: not read ({error})"), err=True)


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "-"


def _drive_lines(drive, folder, indent: str, owners: dict | None = None) -> list[str]:
    if not drive.is_disk:
        return [f"{indent}{drive.slot}  {drive.kind}  {drive.path or '(empty)'}"]
    if drive.local is None:
        return [f"{indent}{drive.slot}  {drive.kind}  {drive.path}  MISSING ({drive.found_by})"]
    lines = [f"{indent}{drive.slot}  {drive.kind}  {drive.path}", f"{indent}    -> {drive.local} ({drive.found_by})"]
    chain = folder.chains.get(drive.local)
    if chain is not None:
        for n, layer in enumerate(chain.layers):
            dirty = "  dirty log" if layer["dirty_log"] else ""
            names = (owners or {}).get(os.path.realpath(layer["path"]), [])
            owner = f"  <- {', '.join(names)}" if names else ("  <- no configuration names it" if n else "")
            lines.append(f"{indent}    {'layer' if n else 'file '} {render.human_size(layer['file_size']):>10}  "
                         f"{layer['disk_type']:<12} {layer['path']}{owner}{dirty}")
        if chain.error:
            lines.append(f"{indent}    BROKEN CHAIN: {chain.error}")
    return lines


def vm_text(v, folder) -> str:
    from vhdx.hyperv.vm import layer_owners  # noqa: PLC0415 - start-up (issue 15 item 2)

    lines = [f"VM {v.name or '(no name)'}", f"  id: {v.id}",
             f"  generation: {v.generation or '?'}   configuration version: {v.version or '?'}   ({v.format})",
             f"  configuration: {v.config_path}", f"  created: {_when(v.created)}",
             f"  state changed: {_when(v.state_changed)}"]
    if v.notes:
        lines.append(f"  notes: {v.notes}")
    if v.replayed_log_entries:
        lines.append(f"  configuration log: {v.replayed_log_entries} entries replayed in memory (file left as is)")
    lines.append("  drives (each layer with the checkpoint whose disk it is):")
    owners = layer_owners(v)
    for d in v.drives:
        lines += _drive_lines(d, folder, "    ", owners)
    for s in v.state_files:
        lines.append(f"  state file: {s.kind} {render.human_size(s.size)} {s.path}")
    lines.append(tree_text(v, folder))
    return "\n".join(lines)


def tree_text(v, folder) -> str:
    if not v.checkpoints:
        return "  checkpoints: none"
    lines = ["  checkpoints (parents derived from the disks; type derived from saved state unless configured):"]

    def walk(parent_id, prefix: str) -> None:
        nodes = [("cp", c) for c in v.children(parent_id)]
        if parent_id == v.now_parent_id:
            nodes.append(("now", None))
        for i, (what, c) in enumerate(nodes):
            last = i == len(nodes) - 1
            branch, cont = ("`-- ", "    ") if last else ("|-- ", "|   ")
            if what == "now":
                lines.append(f"{prefix}{branch}Now (the VM's running state)")
                continue
            lines.append(f"{prefix}{branch}{c.name}  [{c.kind}]  {_when(c.created)}  {c.id}")
            for d in c.drives:
                if d.is_disk:
                    where = d.local or f"MISSING ({d.found_by})"
                    lines.append(f"{prefix}{cont}    disk {d.slot}: {where}")
            walk(c.id, prefix + cont)

    walk(None, "    ")
    known = {c.id for c in v.checkpoints}
    if v.now_parent_id is not None and v.now_parent_id not in known:
        lines.append("    Now (the VM's running state)")
    return "\n".join(lines)


@vm.command()
@click.argument("folder", type=EXISTING_PATH)
@vm_folder_options("disks and parents")
@handle_errors
def audit(folder, search_dirs):
    """Audit the VM folder FOLDER offline: orphaned and missing disks, broken chains, dirty logs, clean-up plan.

    Nothing is written; merges in the plan are dry runs. Exit code 2 when disks are missing or chains broken,
    3 when only space is held by orphans or lingering checkpoint disks, 0 when clean.
    """
    from vhdx.hyperv.vm_audit import audit_folder  # noqa: PLC0415 - start-up (issue 15 item 2)

    result = audit_folder(folder, search_dirs)
    render.report(result.to_json(), lambda: render.printable_lines(audit_text(result).split("\n")))
    if result.exit_code:
        raise SystemExit(result.exit_code)


def audit_text(result) -> str:
    from vhdx_cli.hyperv_cmds import audit_text as live_audit_text  # noqa: PLC0415 - start-up: the live Hyper-V command module

    lines = []
    for report in result.reports:
        lines.append(live_audit_text(report))  # the same rendering as `vhdx hyperv audit`
    lines += [f"WARNING: {w}" for w in result.warnings]
    for o in result.orphans:
        where = "running chain" if o["on_chain"] else "no chain"
        lines.append(f"orphan ({where}) {render.human_size(o['bytes']):>10}  {o['path']}  ({o['why']})")
    if result.orphans:
        lines.append(f"orphans hold {render.human_size(sum(o['bytes'] for o in result.orphans))}")
    for m in result.missing:
        lines.append(f"MISSING {m['owner']} {m['slot']}: {m['path']} ({m['tried']})")
    for b in result.broken:
        lines.append(f"BROKEN CHAIN {b['owner']} {b['slot']}: {b['error']}")
    for d in result.dirty:
        lines.append(f"dirty: {d['path']} ({d['what']})")
    for p in result.interrupted_merges:
        lines.append(f"INTERRUPTED MERGE: {p} (finish it with `vhdx merge --resume`)")
    for p, error in result.folder.unreadable:
        lines.append(f"unreadable configuration: {p} ({error})")
    numbered = [s for s in result.plan if "dry_run" in s or "dry_run_error" in s or "offline" in s]
    if numbered:
        lines.append("offline details:")
    for s in numbered:
        lines.append(f"  {s['title']}")
        if "dry_run" in s:
            d = s["dry_run"]
            lines.append(f"    dry run: copies {render.human_size(d['bytes_to_copy'] or 0)}, needs up to "
                         f"{render.human_size(d['space_needed'])} more, frees {render.human_size(d['space_freed'])}")
            lines.append(f"    then: {s['configuration_change']}")
        if "dry_run_error" in s:
            lines.append(f"    dry run refused: {s['dry_run_error']}")
        if "offline" in s:
            lines.append(f"    offline: {s['offline']}")
    stray = [s for s in result.plan if "space_freed" in s]
    for s in stray:
        lines.append(f"  {s['title']}: {s['note']}")
    return "\n".join(lines)


@vm.command()
@click.argument("path", type=EXISTING_PATH)
@click.option("--png", "png", required=True, type=NEW_FILE, help="PNG file to write.")
@click.option("--dot", "dot_file", type=NEW_FILE, help="Also write the Graphviz source here.")
@force_option("Replace the PNG (and --dot) file if it exists.")
@vm_folder_options("disks")
@handle_errors
def tree(path, png, dot_file, force, search_dirs):
    """Draw the checkpoint tree of the VM at PATH with its disks, sizes and orphans into a PNG."""
    from vhdx.hyperv.vm_audit import audit_folder  # noqa: PLC0415 - start-up (issue 15 item 2)
    from vhdx.hyperv.vm_picture import to_dot, tree_graph, write_png  # noqa: PLC0415

    graph = tree_graph(audit_folder(path, search_dirs))
    engine = write_png(graph, png, overwrite=force)
    if dot_file:
        with open(dot_file, "w" if force else "x", encoding="utf-8") as f:
            f.write(to_dot(graph))
    render.report({"png": os.path.abspath(png), "png_given": png,
                   "dot": os.path.abspath(dot_file) if dot_file else None, "boxes": len(graph.nodes), "engine": engine},
                  lambda: render.printable(f"{png}: {len(graph.nodes)} boxes drawn with {engine}"))
