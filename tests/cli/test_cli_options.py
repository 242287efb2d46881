"""Options mean the same on every command (issue 17.6): one --json, one set of chain options, one --search-dir."""

from __future__ import annotations

import shutil

import click
import pytest
from click.testing import CliRunner

from vhdx.ops.create import create
from vhdx_cli.main import cli

MiB = 1 << 20
# Every command that opens a disk with its chain, and the words it needs besides the child (C), an output
# file (O) and a folder (D).
CHAIN_COMMANDS = {
    "info": ["C"], "chain": ["C"], "map": ["C"], "hash": ["C"], "diff": ["C"], "slack": ["C"],
    "partitions": ["C"], "check": ["--chain", "C"], "convert": ["C", "O"], "flatten": ["C", "O"],
    "merge": ["--dry-run", "C"], "compare": ["C", "C"], "compact": ["--dry-run", "C"],
}
# Commands that also open a chain, but only with a running server or FUSE mount (their options are checked).
SERVING_COMMANDS = ("serve", "mount")


def leaf_commands(group: click.Group, prefix: str = ""):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            yield from leaf_commands(command, f"{prefix}{name} ")
        else:
            yield prefix + name, command


def option_names(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in getattr(param, "opts", ())}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture()
def moved(tmp_path):
    """A child whose parent moved to another folder (its locator leads nowhere; a search folder finds it)."""
    create(tmp_path / "base.vhdx", 4 * MiB, block_size=MiB)
    create(tmp_path / "child.avhdx", parent=tmp_path / "base.vhdx")
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "base.vhdx", tmp_path / "moved" / "base.vhdx")
    return tmp_path / "child.avhdx", tmp_path / "moved"


def words(template, child, tmp_path):
    return [{"C": child, "O": tmp_path / "out.vhdx", "D": tmp_path}.get(w, w) for w in template]


@pytest.mark.parametrize("name", [*CHAIN_COMMANDS, *SERVING_COMMANDS])
def test_every_command_that_opens_a_chain_takes_search_dir(name):
    assert "--search-dir" in option_names(cli.get_command(click.Context(cli), name))


@pytest.mark.parametrize("name", sorted(CHAIN_COMMANDS))
def test_a_command_finds_a_moved_parent_in_a_search_dir(moved, tmp_path, name):
    child, folder = moved
    result = run(name, *words(CHAIN_COMMANDS[name], child, tmp_path), "--search-dir", folder)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", ["flatten", "merge"])
def test_search_is_a_hidden_deprecated_spelling_of_search_dir(moved, tmp_path, name):
    child, folder = moved
    result = run(name, *words(CHAIN_COMMANDS[name], child, tmp_path), "--search", folder)
    assert result.exit_code == 0, result.output
    assert "--search is deprecated; use --search-dir" in result.stderr
    assert "--search " not in run(name, "--help").output


def test_the_chain_options_are_spelled_alike_wherever_they_appear():
    helps = {}
    for name, command in leaf_commands(cli):
        for param in command.params:
            for opt in set(getattr(param, "opts", ())) & {"--parent", "--ignore-id-mismatch", "--orphan"}:
                if name not in ("repair", "create", "set-parent"):  # their --parent is the new parent
                    helps.setdefault(opt, set()).add(param.help)
    assert helps and all(len(texts) == 1 for texts in helps.values()), helps


@pytest.mark.parametrize("name", [name for name, _ in leaf_commands(cli)])
def test_every_command_takes_json_from_the_one_decorator(name):
    command = dict(leaf_commands(cli))[name]
    owners = [param.name for param in command.params if "--json" in getattr(param, "opts", ())]
    assert owners == ["shared_as_json"], owners
