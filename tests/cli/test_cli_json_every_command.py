"""Every command of ``vhdx`` answers ``--json`` (per command and global) with a document its schema accepts.

The list of commands comes from the click group itself (lazy commands and subcommands included), so a new
command without a schema and an invocation here fails ``test_every_command_has_a_schema_and_an_invocation``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import vhdx
from tests.adversarial.test_merge_abort import crash_on_first_write_of
from tests.forensics.helpers import build_chain
from tests.support.faulty_io import SimulatedCrash
from vhdx.forensics import fuse, nbd
from vhdx_cli.json_schemas import SCHEMAS
from vhdx_cli.main import cli

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a test dependency (pip install '.[test]')")
MiB = 1 << 20
RECORDINGS = Path(__file__).parent.parent / "hyperv" / "recordings"
BROKEN_HV_DISK = "D:\\Hyper-V\\web01\\Virtual Hard Disks\\web01_5E6F7081-92A3-4B4C-8D5E-6F708192A3B4.avhdx"


def leaf_commands(group: click.Group, prefix: str = "") -> list[str]:
    ctx = click.Context(group)
    names = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        names += leaf_commands(command, f"{prefix}{name} ") if isinstance(command, click.Group) else [prefix + name]
    return names


def replay(name: str) -> list[str]:
    """Group options of `vhdx hyperv`: answer from this recording (FakeTransport) instead of a host."""
    return ["--replay", str(RECORDINGS / f"{name}.json")]


def vm_folder() -> str:
    assert CliRunner().invoke(cli, ["fixture", "build", "vm-checkpoints", "vm"]).exit_code == 0
    return "vm"


def interrupted_merge(names) -> None:
    """Leave the merge of the top layer into the base interrupted before the base changed."""
    with pytest.raises(SimulatedCrash):
        vhdx.merge_chain(names[-1], into=names[0], opener=crash_on_first_write_of(os.path.abspath(names[0])))


# Schema name -> (command, options of its group, its arguments given the chain's file names, expected exit code).
# Names on the command line are relative (the test runs in the chain's folder): the JSON must make them absolute.
INVOCATIONS = {
    "info": ("info", [], lambda n: [n[-1]], 0),
    "chain": ("chain", [], lambda n: [n[-1]], 0),
    "map": ("map", [], lambda n: [n[-1]], 0),
    "check": ("check", [], lambda n: ["--chain", n[-1]], 0),
    "hash": ("hash", [], lambda n: [n[-1]], 0),
    "diff": ("diff", [], lambda n: [n[-1]], 0),
    "compare": ("compare", [], lambda n: [n[0], n[-1]], 1),
    "slack": ("slack", [], lambda n: [n[-1]], 0),
    "partitions": ("partitions", [], lambda n: [n[0]], 0),
    "create": ("create", [], lambda n: ["new.vhdx", "--size", "4M"], 0),
    "write": ("write", [], lambda n: [n[-1], "--offset", "0", "--pattern", "0x33", "--length", "4096"], 0),
    "discard": ("discard", [], lambda n: [n[-1], "--offset", "1M", "--length", "1M"], 0),
    "convert": ("convert", [], lambda n: [n[-1], "out.raw"], 0),
    "flatten": ("flatten", [], lambda n: [n[-1], "flat.vhdx"], 0),
    "repair": ("repair", [], lambda n: ["--dry-run", n[-1]], 0),
    "merge": ("merge", [], lambda n: [n[-1]], 0),
    "merge --dry-run": ("merge", [], lambda n: ["--dry-run", n[-1]], 0),
    "merge --abort": ("merge", [], lambda n: (interrupted_merge(n), ["--abort", n[-1]])[1], 0),
    "set-parent": ("set-parent", [], lambda n: [n[-1], n[-2]], 0),
    "resize": ("resize", [], lambda n: [n[0], "--size", "16M", "--force"], 0),
    "compact": ("compact", [], lambda n: ["--dry-run", n[0], "--force"], 0),
    "serve": ("serve", [], lambda n: [n[-1]], 0),
    "mount": ("mount", [], lambda n: [n[-1], "."], 0),
    "scan": ("scan", [], lambda n: ["."], 0),
    "vm show": ("vm show", [], lambda n: [vm_folder()], 0),
    "vm audit": ("vm audit", [], lambda n: [vm_folder()], 2),
    "vm tree": ("vm tree", [], lambda n: [vm_folder(), "--png", "tree.png"], 0),
    "fixture list": ("fixture list", [], lambda n: [], 0),
    "fixture build": ("fixture build", [], lambda n: ["dynamic", "built"], 0),
    "hyperv vms": ("hyperv vms", replay("vms"), lambda n: [], 0),
    "hyperv checkpoints": ("hyperv checkpoints", replay("web01"), lambda n: ["web01"], 0),
    "hyperv audit": ("hyperv audit", replay("db01"), lambda n: ["db01"], 0),
    "hyperv info": ("hyperv info", replay("disks"), lambda n: ["D:\\images\\fixed.vhdx"], 0),
    "hyperv check": ("hyperv check", replay("disks"), lambda n: [BROKEN_HV_DISK], 2),
    "hyperv remove-checkpoint": ("hyperv remove-checkpoint", replay("app01-merge"),
                                 lambda n: ["app01", "nightly", "--wait"], 0),
    "hyperv remove-checkpoint --dry-run": ("hyperv remove-checkpoint", [], lambda n: ["app01", "x", "--dry-run"], 0),
    "hyperv merge": ("hyperv merge", replay("disks"),
                     lambda n: ["E:\\VMs\\db01\\db01_66666666-7777-4888-9999-AAAAAAAAAAAA.avhdx", "--into",
                                "E:\\VMs\\db01\\db01.vhdx"], 0),
    "hyperv merge --dry-run": ("hyperv merge", [], lambda n: ["C:\\vm\\disk.avhdx", "--dry-run"], 0),
    "bench": ("bench", [], lambda n: ["--size", "64M"], 0),
}
SLOW = {"bench"}  # a few seconds of real work even at its smallest size


@pytest.fixture()
def names(tmp_path, monkeypatch):
    child_ops = [("write", MiB, b"b" * 65536), ("discard", 2 * MiB, MiB)]
    paths = build_chain(tmp_path, [[("write", 0, b"a" * MiB)], [("write", 3 * MiB, b"c" * 4096)], child_ops])
    monkeypatch.chdir(tmp_path)
    # serve and mount: the JSON comes before nbdkit or FUSE take over; neither is started here.
    monkeypatch.setattr(nbd, "run_server", lambda argv, unix: 0)
    monkeypatch.setattr(nbd, "check_nbdkit", lambda: "nbdkit")
    monkeypatch.setattr(fuse, "load_fuse", lambda: None)
    monkeypatch.setattr(fuse, "mount", lambda layer, mountpoint, name=None, ready=None: ready(
        os.path.join(os.path.abspath(mountpoint), name or fuse.raw_name(layer.path))))
    return [os.path.basename(p) for p in paths]


def test_every_command_has_a_schema_and_an_invocation():
    covered = {command for command, _, _, _ in INVOCATIONS.values()}
    missing = [name for name in leaf_commands(cli) if name not in covered]
    assert not missing, f"commands without a --json schema and a test invocation here: {missing}"
    assert set(INVOCATIONS) <= set(SCHEMAS)


@pytest.mark.parametrize("where", ["command", "global"])
@pytest.mark.parametrize("schema", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s
                                    for s in sorted(INVOCATIONS)])
def test_command_json_validates_against_its_schema(names, schema, where):
    command, group_options, args, exit_code = INVOCATIONS[schema]
    group, *sub = command.split()
    words = [group, *group_options, *sub, *args(names)]
    argv = [*words, "--json"] if where == "command" else ["--json", *words]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == exit_code, result.output
    jsonschema.validate(json.loads(result.stdout), SCHEMAS[schema])
