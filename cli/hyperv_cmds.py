"""``vhdx hyperv``: ask a Hyper-V host (local or remote) about VMs, checkpoints and disks; run its merges.

Each command parses options, calls one ``vhdx.hyperv.HyperV`` method and renders the result as text or JSON.
Write-side commands take ``--dry-run``, which prints the exact script and parameters and contacts nobody.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import click

import vhdx
from vhdx.hyperv import FakeTransport, HyperV, LocalPowerShellTransport, PsrpTransport, audit_vm, compare_disk_info
from vhdx.hyperv.models import CheckpointTree
from vhdx.ops.inspect import describe_image
from vhdx_cli import render
from vhdx_cli.common import handle_errors, json_wanted
from vhdx_cli.options import EXISTING_FILE, dry_run_option, json_option

KIND_LEGEND = ("standard = saved memory state; production = no memory state (VSS/fsfreeze, or a standard "
               "checkpoint of a VM that was off); recovery = made by backup software")


@dataclass
class Connection:
    host: str | None
    user: str | None
    password: str | None
    transport: str
    port: int | None
    ssl: bool
    auth: str
    verify_cert: bool
    timeout_s: float
    replay: tuple[str, ...]

    def backend(self) -> HyperV:
        if self.replay:
            transport = FakeTransport.from_files(*self.replay)
        elif self.transport == "psrp":
            if not self.host:
                raise click.UsageError("--transport psrp needs --host")
            if not self.ssl and self.auth in ("basic", "certificate"):
                # WSMan over HTTP can only be encrypted by negotiate, kerberos, ntlm or credssp.
                raise click.UsageError(f"--auth {self.auth} needs --ssl (over --no-ssl nothing would encrypt the "
                                       "session); use --ssl or --auth negotiate, kerberos, ntlm or credssp")
            transport = PsrpTransport(self.host, self.user, self.password, port=self.port, ssl=self.ssl,
                                      auth=self.auth, cert_validation=self.verify_cert,
                                      operation_timeout_s=max(1, int(self.timeout_s)))
        else:
            if self.host:
                raise click.UsageError("--host needs --transport psrp (the local transport runs on this machine)")
            transport = LocalPowerShellTransport()
        return HyperV(transport, query_timeout_s=self.timeout_s)


def _conn(ctx) -> Connection:
    return ctx.find_object(Connection) or ctx.meta["vhdx.hyperv"]


def _ask(ctx, method: str, *args):
    """One request to the host: connect, call ``HyperV.<method>(*args)``, disconnect."""
    with _conn(ctx).backend() as hv:
        return getattr(hv, method)(*args)


PLAN_ONLY = "Print the exact script and parameters; contact no host, change nothing."


@click.group()
@click.option("--host", help="Hyper-V host to reach over PowerShell Remoting (implies --transport psrp).")
@click.option("--user", help="Account for the remote host (DOMAIN\\user or user@domain).")
@click.option("--password", help="Password (prefer --password-env: command lines are visible to others).")
@click.option("--password-env", metavar="VAR", help="Read the password from this environment variable.")
@click.option("--transport", type=click.Choice(["local", "psrp"]), default=None,
              help="local: powershell.exe on this Windows host (default without --host); psrp: remote.")
@click.option("--port", type=int, help="WSMan port (default 5986 with TLS, 5985 without).")
@click.option("--ssl/--no-ssl", default=True, show_default=True, help="WSMan over HTTPS.")
@click.option("--auth", type=click.Choice(["negotiate", "kerberos", "ntlm", "basic", "credssp", "certificate"]),
              default="negotiate", show_default=True, help="Authentication, as pypsrp offers it.")
@click.option("--no-verify-cert", is_flag=True,
              help="Do not validate the host's TLS certificate (validated by default).")
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True,
              help="Seconds allowed for each single request to the host.")
@click.option("--replay", multiple=True, type=click.Path(exists=True, dir_okay=False), hidden=True,
              help="Answer from recorded JSON instead of a host (tests and demos).")
@click.pass_context
def hyperv(ctx, host, user, password, password_env, transport, port, ssl, auth, no_verify_cert, timeout_s, replay):
    """Checkpoint trees, disk facts and merges through a Hyper-V host (local or remote)."""
    if password_env:
        if password_env not in os.environ:
            raise click.UsageError(f"environment variable {password_env} is not set")
        password = os.environ[password_env]
    ctx.meta["vhdx.hyperv"] = Connection(host, user, password, transport or ("psrp" if host else "local"), port, ssl,
                                         auth, not no_verify_cert, timeout_s, tuple(replay))


def _emit(data, text) -> None:
    # Names and paths come from the host (and its files): escaped before they reach the terminal.
    render.report(data, lambda: render.printable_lines((text() if callable(text) else text).split("\n")))


def _emit_plan(call) -> None:
    # --dry-run: the script and its parameters exactly as they would be sent (never pasted into the text).
    if json_wanted():
        render.emit_json({"dry_run": True, "script": call.script.name, "parameters": dict(call.parameters),
                          "text": call.script.text})
    else:
        click.echo(call.render())


@hyperv.command()
@json_option
@click.pass_context
@handle_errors
def vms(ctx):
    """List the host's virtual machines with their state and disks."""
    found = _ask(ctx, "list_vms")
    _emit({"vms": [v.to_json() for v in found]}, vms_text(found))


@hyperv.command()
@click.argument("vm")
@json_option
@click.pass_context
@handle_errors
def checkpoints(ctx, vm):
    """Show VM's checkpoint tree (standard, production, recovery, ...) with each checkpoint's disks."""
    tree = _ask(ctx, "checkpoints", vm)
    _emit(tree.to_json(), tree_text(tree))


@hyperv.command()
@click.argument("path")
@click.option("--compare", "local_copy", type=EXISTING_FILE,
              help="Also read this file (an SMB path or a copy of PATH) with our parser and report differing fields.")
@json_option
@click.pass_context
@handle_errors
def info(ctx, path, local_copy):
    """Show Get-VHD's view of PATH (a path on the host), in the schema of `vhdx info --json`."""
    disk = _ask(ctx, "disk_info", path)
    if local_copy is None:
        _emit(disk.to_json(), disk_text(disk))
        return
    with vhdx.open(local_copy, orphan=True) as image:
        ours = describe_image(image)
    diffs = compare_disk_info(disk.to_disk_info(), ours)
    data = {"hyperv": disk.to_json(), "ours": {"path": ours.path}, "differences": [d.to_json() for d in diffs]}
    _emit(data, compare_text(disk, local_copy, diffs))
    if diffs:
        sys.exit(2)


@hyperv.command()
@click.argument("path")
@json_option
@click.pass_context
@handle_errors
def check(ctx, path):
    """Test-VHD on PATH (a differencing disk is tested with its whole chain). Exit 2 when it fails."""
    result = _ask(ctx, "test_disk", path)
    _emit(result.to_json(), lambda: test_text(result))
    if not result.passed:
        sys.exit(2)


@hyperv.command()
@click.argument("child")
@click.option("--into", "ancestor", help="Merge down to this ancestor (default: CHILD's parent).")
@dry_run_option(PLAN_ONLY)
@json_option
@click.pass_context
@handle_errors
def merge(ctx, child, ancestor, dry_run):
    """Offline merge on the host with Merge-VHD (nothing in the chain may be attached or running)."""
    if dry_run:
        _emit_plan(HyperV.plan_merge_offline(child, ancestor))
        return
    with _conn(ctx).backend() as hv:
        result = hv.merge_offline(child, ancestor, timeout_s=None)
    _emit(result.to_json(), lambda: merge_text(result))


@hyperv.command(name="remove-checkpoint")
@click.argument("vm")
@click.argument("name")
@click.option("--subtree", is_flag=True, help="Also remove every checkpoint below NAME.")
@click.option("--wait", is_flag=True, help="Follow the merge Hyper-V starts until the merged files are gone.")
@click.option("--wait-timeout", type=float, default=None, help="Give up waiting after this many seconds.")
@dry_run_option(PLAN_ONLY)
@json_option
@click.pass_context
@handle_errors
def remove_checkpoint(ctx, vm, name, subtree, wait, wait_timeout, dry_run):
    """Remove checkpoint NAME of VM: Hyper-V merges its disks online (live while the VM runs)."""
    if dry_run:
        _emit_plan(HyperV.plan_remove_checkpoint(vm, name, subtree=subtree))
        return
    with _conn(ctx).backend() as hv:
        job = hv.remove_checkpoint(vm, name, subtree=subtree)
        outcome = hv.wait_for_merge(vm, wait_timeout, job=job, progress=_progress_printer()) if wait else None
    _emit({"job": job.to_json(), "outcome": outcome.to_json() if outcome else None},
          lambda: removal_text(vm, job, outcome))


def _progress_printer():
    enabled = sys.stderr.isatty()

    def show(p) -> None:
        if enabled:
            pct = f"{p.percent:3d}%" if p.percent is not None else " ..."
            click.echo(f"\rmerging {pct}  {len(p.remaining)} file(s) still in use  {p.elapsed_s:,.0f}s ",
                       err=True, nl=False)
    return show


@hyperv.command()
@click.argument("vm")
@json_option
@click.pass_context
@handle_errors
def audit(ctx, vm):
    """Find lingering differencing disks of VM (Recovery checkpoints, orphaned .avhdx) and print the clean-up plan."""
    with _conn(ctx).backend() as hv:
        report = audit_vm(hv.checkpoints(vm), hv.vm_disks(vm))
    _emit(report.to_json(), audit_text(report))


# -- text rendering -----------------------------------------------------------------------------------------


def vms_text(found) -> str:
    if not found:
        return "no virtual machines"
    lines = []
    for v in found:
        lines.append(f"{v.name}  {v.state}  checkpoints: {v.checkpoint_type or '?'}  id {v.id}")
        lines += [f"  {d.slot}: {d.path or '(no disk)'}" for d in v.disks]
    return "\n".join(lines)


def _checkpoint_label(c) -> str:
    flags = " automatic" if c.is_automatic else ""
    hv_type = "" if c.snapshot_type.lower() == "standard" else f" (SnapshotType {c.snapshot_type})"
    return f"{c.name}  [{c.kind}{flags}]{hv_type}  {c.creation_time}  {c.id}"


def tree_text(tree: CheckpointTree) -> str:
    vm = tree.vm
    lines = [f"{vm.name} ({vm.state}, checkpoint setting: {vm.checkpoint_type or '?'})"]
    known = {c.id for c in tree.checkpoints}
    now_parent = vm.parent_checkpoint_id if vm.parent_checkpoint_id in known else None

    def walk(parent_id, prefix: str) -> None:
        nodes = [("cp", c) for c in tree.children(parent_id)]
        if parent_id == now_parent:
            nodes.append(("now", None))
        for i, (what, c) in enumerate(nodes):
            last = i == len(nodes) - 1
            branch, cont = ("`-- ", "    ") if last else ("|-- ", "|   ")
            if what == "now":
                lines.append(f"{prefix}{branch}Now (running state: " +
                             ", ".join(d.path or "?" for d in vm.disks) + ")")
                continue
            lines.append(prefix + branch + _checkpoint_label(c))
            bar = "|" if tree.children(c.id) or c.id == now_parent else " "
            lines.extend(f"{prefix}{cont}{bar}     disk {d.slot}: {d.path}" for d in c.disks)
            walk(c.id, prefix + cont)

    walk(None, "")
    if not tree.checkpoints:
        lines.append("(no checkpoints)")
    lines.append(f"legend: {KIND_LEGEND}")
    return "\n".join(lines)


def test_text(result) -> str:
    lines = [f"{result.path}: {'ok' if result.passed else 'FAILED'}"]
    lines += [f"  {p.message}" + (f" (code {p.code:#x})" if p.code else "") for p in result.problems]
    return "\n".join(lines)


def merge_text(result) -> str:
    gone = "still exists (invalid now, delete it)" if result.source_still_exists else "removed"
    return f"merged {result.source} into {result.destination.path}\n{result.source}: {gone}"


def removal_text(vm: str, job, outcome) -> str:
    lines = [f"removed checkpoint{'s' if len(job.removed) > 1 else ''} {', '.join(job.removed)} of {vm}"]
    lines += [f"  to be merged away: {p}" for p in job.expect_gone]
    if outcome:
        lines.append(f"merge finished in {outcome.elapsed_s:.1f} s; no longer used: "
                     f"{', '.join(outcome.merged) or 'none'}")
    elif job.expect_gone:
        lines.append("Hyper-V merges in the background; follow with --wait or `vhdx hyperv audit`.")
    return "\n".join(lines)


def disk_text(d) -> str:
    return "\n".join([
        f"image: {d.path}", f"file format: {d.format}", f"disk type: {d.disk_type}",
        f"virtual size: {render.human_size(d.virtual_size)} ({d.virtual_size} bytes)",
        f"file size: {render.human_size(d.file_size)} ({d.file_size} bytes)",
        f"block size: {d.block_size}", f"logical sector size: {d.logical_sector_size}",
        f"physical sector size: {d.physical_sector_size}", f"disk id: {d.disk_id}",
        f"parent path: {d.parent_path or '-'}", f"attached: {'yes' if d.attached else 'no'}",
        f"fragmentation: {d.fragmentation_percentage if d.fragmentation_percentage is not None else '?'} %",
    ])


def compare_text(disk, local_copy: str, diffs) -> str:
    if not diffs:
        return f"Hyper-V ({disk.path}) and our parser ({local_copy}) agree on every field"
    lines = [f"Hyper-V ({disk.path}) and our parser ({local_copy}) differ:"]
    lines += [f"  {d.field}: hyper-v {d.hyperv!r}  ours {d.ours!r}" for d in diffs]
    return "\n".join(lines)


def audit_text(report) -> str:
    vm = report.vm
    lines = [f"{vm.name} ({vm.state})"]
    if report.merge_in_progress:
        lines.append("note: Hyper-V is merging right now; run the audit again when it is done")
    for d in report.disks:
        lines.append(f"disk {d.drive.slot}: runs on {len(d.layers)} layer(s)")
        for layer in d.layers:
            owner = f" <- checkpoint {', '.join(layer.checkpoints)}" if layer.checkpoints else ""
            mark = "  LINGERING" if layer.role in ("recovery", "orphan") else ""
            lines.append(f"  {layer.role:<10} {render.human_size(layer.file_size):>10}  {layer.path}{owner}{mark}")
        for path, size in d.stray_files:
            lines.append(f"  {'stray':<10} {render.human_size(size):>10}  {path}  (in no chain)")
    for c in report.recovery_checkpoints:
        lines.append(f"{c.kind} checkpoint: {c.name} ({c.creation_time}, {c.id})")
    if report.clean:
        lines.append("no lingering differencing disks")
        return "\n".join(lines)
    lines.append(f"lingering: {render.human_size(report.lingering_bytes)} in differencing disks")
    lines.append("plan:")
    for n, step in enumerate(report.steps, 1):
        off = " [VM must be off]" if step.requires_vm_off else ""
        lines.append(f"{n}. ({step.mode}) {step.title}{off}")
        lines += [f"     {cmd}" for cmd in step.commands]
        if step.note:
            lines.append(f"     note: {step.note}")
    return "\n".join(lines)
