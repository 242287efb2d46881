"""`vhdx fixture build` and `vhdx fixture list`: reproducible test chains from TOML specs."""

from __future__ import annotations

import os
from dataclasses import replace

import click

from vhdx_cli import render
from vhdx_cli.common import fail, handle_errors
from vhdx_cli.options import force_option, json_option


@click.group()
def fixture():
    """Build fixture disks (exact, reproducible chains, optionally broken on purpose) for tests."""


@fixture.command("build")
@click.argument("spec")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--name", help="Chain name (default: the spec's name or its file name).")
@force_option("Build into OUTDIR even if it is not empty.")
@json_option
@handle_errors
def build_cmd(spec, outdir, name, force):
    """Build SPEC (a .toml file or a ready spec name from `vhdx fixture list`) into OUTDIR with manifest.json."""
    if not force and os.path.isdir(outdir) and os.listdir(outdir):
        fail(f"{outdir} is not empty (its files could be overwritten); pass --force to build into it anyway")
    # Late: a command module imports its heavy parts only in the command that runs (start-up, issue 15 item 2);
    # the builder needs numpy.
    from vhdx_fixtures.builder import build  # noqa: PLC0415
    from vhdx_fixtures.faults import FaultError  # noqa: PLC0415
    from vhdx_fixtures.spec import SpecError, load_spec, ready_spec  # noqa: PLC0415
    from vhdx_fixtures.vm_folder import build_vm_folder, load_vm_spec, vm_spec_names  # noqa: PLC0415

    if spec in vm_spec_names() and not os.path.exists(spec):  # a whole Hyper-V VM folder, not one chain
        try:
            manifest = build_vm_folder(load_vm_spec(spec), outdir)
        except SpecError as exc:
            fail(str(exc))
        render.report(_located(manifest, outdir), lambda: render.printable(
            f"VM folder {outdir} (VM {manifest['vm']['name']}); manifest: {os.path.join(outdir, 'manifest.json')}"))
        return
    try:
        chain = load_spec(spec, name) if os.path.exists(spec) or spec.endswith(".toml") else ready_spec(spec)
        if name and not os.path.exists(spec):
            chain = load_spec_named(chain, name)
        result = build(chain, outdir)
    except (SpecError, FaultError) as exc:
        fail(str(exc))
    render.report(_located(result.manifest, outdir), lambda: built_text(result.manifest, outdir))


def built_text(manifest: dict, outdir: str) -> str:
    lines = []
    for layer in manifest["layers"]:
        codes = ",".join(f["code"] for f in layer["check"]) or "clean"
        # Name what the digest is of: the whole flattened disk, or (above 1 GiB) only the written windows.
        if layer["flat_sha256"]:
            digest = f"flattened sha256 {layer['flat_sha256']}"
        elif layer["windows_sha256"]:
            digest = f"flattened sha256 of the written windows {layer['windows_sha256']}"
        else:
            digest = "flattened sha256 -"
        lines.append(f"{os.path.join(outdir, layer['path'])}  {digest}  {codes}")
    lines.append(f"manifest: {os.path.join(outdir, 'manifest.json')}")
    return render.printable_lines(lines)


def _located(manifest: dict, outdir: str) -> dict:
    # The manifest names files relative to OUTDIR (it travels with the folder); --json also says where that is.
    return {"outdir": os.path.abspath(outdir), "outdir_given": outdir, **manifest}


def load_spec_named(chain, name):
    return replace(chain, name=name)


@fixture.command("list")
@json_option
@handle_errors
def list_cmd():
    """List the ready specs and the named faults."""
    # Late: a command module imports its heavy parts only in the command that runs (start-up, issue 15 item 2).
    from vhdx_fixtures.faults import describe  # noqa: PLC0415
    from vhdx_fixtures.spec import ready_spec, ready_spec_names  # noqa: PLC0415
    from vhdx_fixtures.vm_folder import load_vm_spec, vm_spec_names  # noqa: PLC0415

    specs = [(n, ready_spec(n)) for n in ready_spec_names()]
    vm_specs = [(n, load_vm_spec(n)) for n in vm_spec_names()]
    faults = list(describe())
    render.report({
        "specs": [{"name": n, "description": s.description, "layers": [x.name for x in s.layers],
                   "faults": [f.name for f in s.faults], "peer_deviations": list(s.peer_deviations)} for n, s in specs],
        "faults": [{"name": n, "summary": summary, "codes": list(codes)} for n, summary, codes in faults],
    }, lambda: "\n".join(["ready specs:", *(f"  {n:34s} {s.description}" for n, s in specs),
                          "VM folder specs:", *(f"  {n:34s} {s.description}" for n, s in vm_specs),
                          "faults:", *(f"  {n:34s} {'/'.join(codes)}" for n, _summary, codes in faults)]))
