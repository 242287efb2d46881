"""`vhdx fixture build` and `vhdx fixture list`: reproducible test chains from TOML specs."""

from __future__ import annotations

import os

import click

from vhdx_cli import render
from vhdx_cli.common import State, fail, handle_errors


@click.group()
def fixture():
    """Build fixture disks (exact, reproducible chains, optionally broken on purpose) for tests."""


@fixture.command("build")
@click.argument("spec")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--name", help="Chain name (default: the spec's name or its file name).")
@click.option("--force", is_flag=True, help="Build into OUTDIR even if it is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output (the manifest).")
@click.pass_obj
@handle_errors
def build_cmd(state: State, spec, outdir, name, force, as_json):
    """Build SPEC (a .toml file or a ready spec name from `vhdx fixture list`) into OUTDIR with manifest.json."""
    if not force and os.path.isdir(outdir) and os.listdir(outdir):
        fail(f"{outdir} is not empty (its files could be overwritten); pass --force to build into it anyway")
    from vhdx_fixtures.builder import build
    from vhdx_fixtures.faults import FaultError
    from vhdx_fixtures.spec import SpecError, load_spec, ready_spec
    from vhdx_fixtures.vm_folder import build_vm_folder, load_vm_spec, vm_spec_names

    if spec in vm_spec_names() and not os.path.exists(spec):  # a whole Hyper-V VM folder, not one chain
        try:
            manifest = build_vm_folder(load_vm_spec(spec), outdir)
        except SpecError as exc:
            fail(str(exc))
        if as_json or (state is not None and state.as_json):
            render.emit_json(_located(manifest, outdir))
        else:
            click.echo(f"VM folder {outdir} (VM {manifest['vm']['name']}); manifest: "
                       f"{os.path.join(outdir, 'manifest.json')}")
        return
    try:
        chain = load_spec(spec, name) if os.path.exists(spec) or spec.endswith(".toml") else ready_spec(spec)
        if name and not os.path.exists(spec):
            chain = load_spec_named(chain, name)
        result = build(chain, outdir)
    except (SpecError, FaultError) as exc:
        fail(str(exc))
    if as_json or (state is not None and state.as_json):
        render.emit_json(_located(result.manifest, outdir))
        return
    for layer in result.manifest["layers"]:
        codes = ",".join(f["code"] for f in layer["check"]) or "clean"
        # Name what the digest is of: the whole flattened disk, or (above 1 GiB) only the written windows.
        if layer["flat_sha256"]:
            digest = f"flattened sha256 {layer['flat_sha256']}"
        elif layer["windows_sha256"]:
            digest = f"flattened sha256 of the written windows {layer['windows_sha256']}"
        else:
            digest = "flattened sha256 -"
        click.echo(f"{os.path.join(outdir, layer['path'])}  {digest}  {codes}")
    click.echo(f"manifest: {os.path.join(outdir, 'manifest.json')}")


def _located(manifest: dict, outdir: str) -> dict:
    # The manifest names files relative to OUTDIR (it travels with the folder); --json also says where that is.
    return {"outdir": os.path.abspath(outdir), "outdir_given": outdir, **manifest}


def load_spec_named(chain, name):
    from dataclasses import replace

    return replace(chain, name=name)


@fixture.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.pass_obj
@handle_errors
def list_cmd(state: State, as_json):
    """List the ready specs and the named faults."""
    from vhdx_fixtures.faults import describe
    from vhdx_fixtures.spec import ready_spec, ready_spec_names

    specs = [(n, ready_spec(n)) for n in ready_spec_names()]
    if as_json or (state is not None and state.as_json):
        render.emit_json({
            "specs": [{"name": n, "description": s.description, "layers": [x.name for x in s.layers],
                       "faults": [f.name for f in s.faults], "peer_deviations": list(s.peer_deviations)}
                      for n, s in specs],
            "faults": [{"name": n, "summary": summary, "codes": list(codes)} for n, summary, codes in describe()],
        })
        return
    click.echo("ready specs:")
    for n, s in specs:
        click.echo(f"  {n:34s} {s.description}")
    from vhdx_fixtures.vm_folder import load_vm_spec, vm_spec_names

    click.echo("VM folder specs:")
    for n in vm_spec_names():
        click.echo(f"  {n:34s} {load_vm_spec(n).description}")
    click.echo("faults:")
    for n, _summary, codes in describe():
        click.echo(f"  {n:34s} {'/'.join(codes)}")
