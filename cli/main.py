"""``vhdx``: the command line. Each command parses its options, calls the library once and renders."""

from __future__ import annotations

import click

from vhdx_cli.common import OneLineErrorGroup, State


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vhdx-chain")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output (same as the per-command flag).")
@click.option("-v", "--verbose", is_flag=True, help="More detail.")
@click.option("-p", "--progress", is_flag=True, help="Show progress bars even when stderr is not a terminal.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars and no warnings (errors still print).")
@click.pass_context
def cli(ctx, as_json, verbose, progress, quiet):
    """Read, check, repair and merge VHDX/AVHDX disks and Hyper-V checkpoint chains."""
    ctx.obj = State(as_json, verbose, progress, quiet)


# Every command lives in its own module, imported only when it runs (``--help`` lists the names without importing
# them): ``vhdx --version`` loads neither numpy nor the library, ``vhdx info`` not the merge engine.
cli.lazy_commands.update({
    "info": "vhdx_cli.read_cmds:info",
    "chain": "vhdx_cli.read_cmds:chain",
    "map": "vhdx_cli.read_cmds:map_",
    "convert": "vhdx_cli.convert_cmds:convert",
    "create": "vhdx_cli.write_cmds:create",
    "write": "vhdx_cli.write_cmds:write",
    "discard": "vhdx_cli.write_cmds:discard",
    "set-parent": "vhdx_cli.write_cmds:set_parent",
    "check": "vhdx_cli.check_cmds:check",
    "repair": "vhdx_cli.check_cmds:repair",
    "diff": "vhdx_cli.forensics_cmds:diff",
    "compare": "vhdx_cli.compare_cmds:compare",
    "partitions": "vhdx_cli.partition_cmds:partitions",
    "hash": "vhdx_cli.forensics_cmds:hash_",
    "slack": "vhdx_cli.forensics_cmds:slack",
    "serve": "vhdx_cli.forensics_cmds:serve",
    "mount": "vhdx_cli.forensics_cmds:mount",
    "merge": "vhdx_cli.merge_cmds:merge",
    "flatten": "vhdx_cli.merge_cmds:flatten",
    "hyperv": "vhdx_cli.hyperv_cmds:hyperv",
    "bench": "vhdx_cli.bench_cmds:bench",
    "fixture": "vhdx_cli.fixture_cmds:fixture",
    "vm": "vhdx_cli.vm_cmds:vm",
    "scan": "vhdx_cli.scan_cmds:scan",
    "resize": "vhdx_cli.resize_cmds:resize",
    "compact": "vhdx_cli.resize_cmds:compact",
})


def main() -> None:
    """Console entry (the ``vhdx`` script and ``python -m vhdx_cli.main``): one command, then the process ends."""
    cli.one_shot = True
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
