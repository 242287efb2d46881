"""Options that several commands take, each defined once: ``--json``, how a chain is opened, in-place changes.

A command states what it takes by its decorators; the flag names, types and help texts live here only, so
``vhdx merge``, ``vhdx flatten`` and ``vhdx info`` spell ``--search-dir`` the same way.
"""

from __future__ import annotations

import contextlib
import functools

import click

import vhdx
from vhdx_cli.common import current_state, log_replayed_in_memory, report_invented, warn_if_being_written

EXISTING_FILE = click.Path(exists=True, dir_okay=False)
EXISTING_PATH = click.Path(exists=True)  # a file or a folder (VM folders, .vmcx files)
EXISTING_DIR = click.Path(exists=True, file_okay=False)
NEW_FILE = click.Path(dir_okay=False)


def _want_json(ctx, param, value) -> None:
    if value:
        current_state().as_json = True


def json_option(func):
    """``--json`` after the command name; the global ``vhdx --json CMD`` sets the same switch (``json_wanted``)."""
    return click.option("--json", "shared_as_json", is_flag=True, expose_value=False, callback=_want_json,
                        help="Machine-readable JSON output (same as the global --json).")(func)


def dry_run_option(help_text: str):
    return click.option("--dry-run", is_flag=True, help=help_text)


def force_option(help_text: str):
    return click.option("--force", is_flag=True, help=help_text)


def search_dir_option(help_text: str, *, must_exist: bool = False):
    """``--search-dir DIR`` (repeatable); the older spelling ``--search`` is still read, hidden and deprecated."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, deprecated_search=(), **kwargs):
            if deprecated_search:
                if not current_state().quiet:
                    click.echo("vhdx: warning: --search is deprecated; use --search-dir", err=True)
                kwargs["search_dirs"] = (*kwargs.get("search_dirs", ()), *deprecated_search)
            return func(*args, **kwargs)

        folder = click.Path(file_okay=False, exists=must_exist)
        wrapper = click.option("--search", "deprecated_search", multiple=True, type=folder, hidden=True)(wrapper)
        return click.option("--search-dir", "search_dirs", multiple=True, type=folder, help=help_text)(wrapper)

    return decorate


PARENTS_HELP = "Also look for parents by file name in this folder (repeatable)."
# How a chain is opened, by the keyword ``vhdx.open`` takes each under, in the order --help lists them.
CHAIN_OPTION_NAMES = ("parent", "search_dirs", "ignore_id_mismatch", "orphan")


def _chain_option(name: str, search_help: str):
    if name == "parent":
        return click.option("--parent", "parent", type=NEW_FILE,
                            help="Use this file as the parent, whatever the locator says.")
    if name == "search_dirs":
        return search_dir_option(search_help, must_exist=True)
    if name == "ignore_id_mismatch":
        return click.option("--ignore-id-mismatch", is_flag=True,
                            help="Accept a parent whose DataWriteGuid does not match the child's linkage.")
    return click.option("--orphan", is_flag=True,
                        help="Read a differencing disk alone: what it does not hold reads as zeros.")


def chain_options(func=None, *, only: tuple[str, ...] = CHAIN_OPTION_NAMES, search_help: str = PARENTS_HELP):
    """--parent, --search-dir, --ignore-id-mismatch, --orphan: how to find the parents of a disk.

    ``@chain_options`` gives all of them; ``@chain_options(only=(...))`` the ones the command's library call takes
    (merge finds parents only by folder). The values arrive under the keywords of ``vhdx.open``.
    """
    if func is None:
        return functools.partial(chain_options, only=only, search_help=search_help)
    for name in reversed(only):
        func = _chain_option(name, search_help)(func)
    return func


def open_kwargs(parent=None, search_dirs=(), ignore_id_mismatch=False, orphan=False) -> dict:
    return {"parent": parent, "search_dirs": search_dirs, "ignore_id_mismatch": ignore_id_mismatch,
            "orphan": orphan}


def salvage_option(func):
    """--salvage: read payload a truncated file lacks as zeros (default: refuse), listing what was invented."""
    return click.option("--salvage", is_flag=True,
                        help="Read payload missing from a truncated file as zeros instead of refusing it; every "
                             "range so invented is listed on stderr.")(func)


def dependents_options(what: str, force_help: str | None = None):
    """--force and --search-dir: changing a disk that differencing disks depend on breaks them (as in Hyper-V)."""
    force_help = force_help or f"Write even though other disks depend on {what} (they will refuse to open)."

    def decorate(func):
        func = search_dir_option(f"Also look here for disks that depend on {what} (repeatable).",
                                 must_exist=True)(func)
        return force_option(force_help)(func)

    return decorate


def in_place_options(what: str):
    """--dry-run and --resume of the commands that change a disk's layout in place (resize, compact)."""

    def decorate(func):
        func = click.option("--resume", is_flag=True, help=f"Finish an interrupted {what}.")(func)
        return dry_run_option("Say what would happen and change nothing.")(func)

    return decorate


def vm_folder_options(what: str):
    """--search-dir and --json of the `vm` commands (they read a VM folder and the disks it names)."""

    def decorate(func):
        func = json_option(func)
        return search_dir_option(f"Also look here (by file name) for {what} outside the folder. Repeatable.",
                                 must_exist=True)(func)

    return decorate


class Reading:
    """A chain opened by a read command: ``image``, and after the block whether a dirty log was replayed."""

    def __init__(self, image) -> None:
        self.image = image
        self.replayed = False


@contextlib.contextmanager
def reading(path, chain_opts: dict, *, salvage: bool = False):
    """Open PATH and its chain read-only as the chain options say; on the way out, say what the reader met.

    That is: a writer at work on a layer, a dirty log replayed in memory, and every range --salvage invented.
    """
    with vhdx.open(path, **open_kwargs(**chain_opts), salvage=salvage) as image:
        opened = Reading(image)
        yield opened
        warn_if_being_written(image)
        report_invented(image)
        opened.replayed = log_replayed_in_memory(image)
