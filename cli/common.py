"""Shared pieces of the command line: error handling, size parsing, chain options, progress."""

from __future__ import annotations

import functools
import gc
import importlib
import os
import re
import sys
import time

import click

from vhdx.errors import VhdxError
from vhdx_cli.hints import error_line
from vhdx_cli.text import printable

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """'10G', '512', '4k', '1.5M', '0x1000' -> bytes (binary suffixes, as qemu-img reads them)."""
    s = str(text).strip()
    if s.lower().startswith("0x"):
        return int(s, 16)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgGtTpPbB]?)(?:i?[bB])?", s)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size (examples: 512, 4K, 10G)")
    number, suffix = m.groups()
    value = float(number) * _SUFFIXES[suffix.upper()]
    if value != int(value):
        raise click.BadParameter(f"{text!r} is not a whole number of bytes")
    return int(value)


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except click.BadParameter as exc:
            self.fail(exc.message, param, ctx)


SIZE = SizeType()


class State:
    """Options shared by every command (the click context object)."""

    def __init__(self, as_json: bool = False, verbose: bool = False, progress: bool = False,
                 quiet: bool = False) -> None:
        self.as_json = as_json
        self.verbose = verbose
        self.progress = progress  # -p: progress bars even when stderr is not a terminal (into logs)
        self.quiet = quiet  # -q: no progress bars, no warnings; results and errors still print


def current_state() -> State:
    """The State of the running command line (a default one outside click)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return State()
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State()
    return root.obj


# Flags every command also takes after its name (`vhdx info X -v`), as qemu-img users type them.
SHARED_FLAGS = (("verbose", "-v", "--verbose", "More detail."),
                ("progress", "-p", "--progress", "Show progress bars even when stderr is not a terminal."),
                ("quiet", "-q", "--quiet", "No progress bars and no warnings (errors still print)."))
# (--json after the command name is vhdx_cli.options.json_option, which every command declares.)


def _set_shared_flag(ctx, param, value) -> None:
    if value:
        setattr(current_state(), param.name.removeprefix("shared_"), True)


def add_shared_flags(command: click.Command) -> click.Command:
    """Give COMMAND the global -v/-p/-q too, unless it already uses the name or letter for something else."""
    taken = {opt for param in command.params for opt in getattr(param, "opts", ())}
    for name, short, long, help_text in SHARED_FLAGS:
        opts = [o for o in (short, long) if o and o not in taken]
        if long in taken or not opts or any(p.name == f"shared_{name}" for p in command.params):
            continue
        command.params.append(click.Option(opts, f"shared_{name}", is_flag=True, expose_value=False,
                                           callback=_set_shared_flag, help=help_text))
    return command


# What the shell reports for a tool stopped by SIGPIPE (qemu-img, cat): `vhdx map X | head` ends like them.
BROKEN_PIPE_EXIT = 128 + 13


def exit_on_broken_pipe() -> None:
    """The reader of stdout has gone (``| head``): stop quietly, without a traceback or an error line."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
    except (OSError, ValueError):
        pass
    sys.exit(BROKEN_PIPE_EXIT)


# Version of every --json document (and of the error document below); bump it when a field changes meaning.
SCHEMA_VERSION = 1
# Set by the command line's entry point: --json anywhere in the arguments (usage errors come before any context).
_json_in_args = False


def json_wanted() -> bool:
    """Whether the running command was asked for JSON (global or per-command --json)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and (ctx.params.get("as_json") or current_state().as_json):
        return True
    return _json_in_args


def fail(message: str, code: int = 1, error: VhdxError | None = None) -> None:
    """One line on stderr and exit CODE; in --json mode also the error as JSON on stdout (same exit code)."""
    if json_wanted():
        details = {"message": printable(message), "exit_code": code}
        if error is not None:
            details.update(structure=error.structure, offset=error.offset, path=error.path)
            if isinstance(getattr(error, "code", None), str):
                details["code"] = error.code
        import json  # noqa: PLC0415 - only --json output needs it (start-up cost)

        click.echo(json.dumps({"schema_version": SCHEMA_VERSION, "error": details}, indent=2))
    click.echo(f"vhdx: error: {printable(message)}", err=True)
    sys.exit(code)


class OneLineErrorGroup(click.Group):
    """A click group whose usage errors (bad option, missing file, ...) print one line, like library errors.

    Click's own format (usage, hint, blank line, message) spans four lines; scripts and our error contract
    expect ``vhdx: error: <message>``. Bad arguments exit with 1 ("could not run", as qemu-img does): 2 is
    what ``check`` says when it finds corruption.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands: dict[str, str] = {}  # name -> "module:attribute", imported on first use
        self.one_shot = False  # set by the console entry: this process runs one command, then ends

    def list_commands(self, ctx) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx, name: str):
        command = super().get_command(ctx, name)
        if command is None and name in self.lazy_commands:
            module_name, attribute = self.lazy_commands[name].split(":")
            # The import builds thousands of objects and no garbage: cyclic GC passes over them are pure start-up
            # cost (a few % of every command), so the collector pauses for the import and resumes as it was.
            gc_was_on = gc.isenabled()
            gc.disable()
            try:
                module = importlib.import_module(module_name)
            finally:
                if gc_was_on:
                    gc.enable()
            if self.one_shot:
                # What the import built lives until exit: in the permanent generation, neither the collections
                # during the command nor the last one at exit walk it again (never done for library use).
                gc.freeze()
            command = getattr(module, attribute)
            self.add_command(command, name)
        if command is not None and not isinstance(command, click.Group):
            add_shared_flags(command)
        return command

    def main(self, args=None, *rest, standalone_mode: bool = True, **kwargs):
        global _json_in_args
        _json_in_args = "--json" in (sys.argv[1:] if args is None else list(args))
        if not standalone_mode:
            return super().main(args, *rest, standalone_mode=False, **kwargs)
        try:
            rv = super().main(args, *rest, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):
                exc.show()  # bare ``vhdx``: the help text is the message
                sys.exit(exc.exit_code)
            fail(" ".join(exc.format_message().split()), 1)
        except click.Abort:
            fail("aborted", 1)
        except BrokenPipeError:
            exit_on_broken_pipe()
        # Without standalone mode click returns the exit code of ``ctx.exit`` (e.g. after --help) instead of exiting.
        sys.exit(rv if isinstance(rv, int) else 0)


def errors_exit(code: int):
    """A decorator turning library and OS errors into one line on stderr and exit CODE (never a traceback)."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except VhdxError as exc:
                fail(error_line(exc), code, error=exc)
            except BrokenPipeError:
                exit_on_broken_pipe()
            except OSError as exc:
                fail(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}", code)
            except MemoryError:
                fail("out of memory (the request or the file asks for more than this machine can hold)", code)
            except KeyboardInterrupt:
                fail("interrupted", 130)

        return wrapper

    return decorate


# Most commands exit 1 when they could not run (2 is what ``check`` says when it finds corruption).
handle_errors = errors_exit(1)


def report_invented(image) -> None:
    """List, on stderr, every virtual range that --salvage filled with zeros, layer by layer."""
    for layer in image.layers_opened():
        for start, length in layer.invented:
            click.echo(f"vhdx: salvage: {layer.path}: virtual {start:#x} length {length:#x} is missing from the "
                       "file (truncated); read as zeros", err=True)


def warn_if_being_written(image) -> None:
    """Read-only commands never block writers, but say so when one is at work on a layer of the chain."""
    if current_state().quiet:
        return
    for layer in image.layers_opened():
        if layer.io.writer_lock_held():
            warn_in_use(layer.path)
        if layer.log.needs_replay:
            warn_replayed(layer.path)


def log_replayed_in_memory(disk) -> bool:
    """Whether reading DISK (an image, or a raw disk: no log) replayed a layer's dirty log in memory only."""
    opened = getattr(disk, "layers_opened", lambda: [])()
    return any(layer.log.needs_replay and not layer.io.writable for layer in opened)


def warn_in_use(path: str) -> None:
    click.echo(f"vhdx: warning: {printable(path)} is open for writing by another process; "
               "what is read may change while it is read", err=True)


def warn_replayed(path: str) -> None:
    click.echo(f"vhdx: warning: {printable(path)} has a dirty log; reading it replayed in memory "
               "(the file is not changed)", err=True)


class Progress:
    """Bytes done, rate and ETA on stderr: when stderr is a terminal or with -p, never with -q."""

    def __init__(self, total: int, label: str, enabled: bool | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        if enabled is None:
            state = current_state()
            enabled = not state.quiet and (state.progress or sys.stderr.isatty())
        self.enabled = enabled
        self.start = time.monotonic()
        self._last = 0.0

    def __call__(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.2 and done < self.total:
            return
        self._last = now
        elapsed = max(now - self.start, 1e-6)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate else 0
        click.echo(f"\r{self.label}: {done * 100 // self.total:3d}% {done / 2**20:,.0f} MiB "
                   f"{rate / 2**20:,.1f} MiB/s ETA {eta:,.0f}s ", err=True, nl=False)

    def finish(self) -> None:
        if self.enabled:
            click.echo("", err=True)
