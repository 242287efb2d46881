"""Timing machinery: methods run round-robin, untimed setup/teardown, peak RSS of child processes.

Runs are warm-cache: every input file is read once before a case is timed, so all methods see the same
page-cache state; ``os.sync()`` runs (untimed) before each timed run so one run's dirty pages do not slow the
next. Every method that writes an output file fsyncs it, so each one pays for durable output alike.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import venv
import zlib
from dataclasses import dataclass

from vhdx_cli.bench_timing import (  # noqa: F401 - the benches import them from here
    Method,
    Outcome,
    ToolFailed,
    copy_file_range_all,
    remove,
    run_methods,
)

READ_CHUNK = 8 << 20


# Peak RSS of a command comes from GNU time (%M), which forks it from its own small process: the ru_maxrss
# that wait4 reports here would include this harness, because Linux keeps the high-water mark across the
# vfork+exec that subprocess uses.
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def run_tool(args: list[str], *, ok_codes=(0,), cwd: str | None = None) -> dict:
    """Run a command; returns its stdout and peak RSS in KiB (None without GNU time). Raises ToolFailed."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        prefix = [GNU_TIME, "-q", "-f", "%M", "-o", rss.name] if GNU_TIME else []
        proc = subprocess.run([*prefix, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        peak = rss.read().strip().splitlines() if GNU_TIME else []
    if proc.returncode not in ok_codes:
        lines = [line for line in stderr.strip().splitlines() if line.strip()] or [f"exit {proc.returncode}"]
        raise ToolFailed(short_error(os.path.basename(args[0]), lines[0]))
    return {"peak_rss_kib": int(peak[-1]) if peak and peak[-1].isdigit() else None, "stdout": stdout}


def short_error(tool: str, line: str) -> str:
    """``tool: message`` once, with file paths cut to their names and repeated clauses dropped."""
    text = re.sub(r"'(?:[^']*/)([^'/]+)'", r"'\1'", line.strip())
    text = text.removeprefix(f"{tool}: ")
    parts = []
    for part in text.split(": "):
        if part not in parts:
            parts.append(part)
    return f"{tool}: " + ": ".join(parts)


def warm(paths) -> None:
    """Read the data parts of each file once so that timed runs start from the same warm page cache."""
    buf = bytearray(READ_CHUNK)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
                while start < end:
                    got = os.preadv(fd, [memoryview(buf)[: min(READ_CHUNK, end - start)]], start)
                    if got <= 0:
                        break
                    start += got
                pos = end
        finally:
            os.close(fd)


def file_digest(path: str, size: int | None = None) -> str:
    """CRC-32 of a file's bytes up to ``size`` (a missing tail counts as zeros), with the length."""
    crc, done = 0, 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(READ_CHUNK)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            done += len(chunk)
    if size is not None and done < size:
        zeros = bytes(READ_CHUNK)
        while done < size:
            n = min(READ_CHUNK, size - done)
            crc = zlib.crc32(zeros[:n], crc)
            done += n
    return f"{crc:08x}/{done}"


@contextlib.contextmanager
def bytecode_cache(folder: str):
    """Child processes started inside read and write their .pyc files under ``folder``, as an installed copy has
    them (pip compiles at install); PYTHONDONTWRITEBYTECODE=1 would make every run compile vhdx's sources again."""
    saved = {name: os.environ.get(name) for name in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = folder
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def compile_sources(*modules: str) -> None:
    """Compile the packages ``modules`` into the active bytecode cache (untimed, as pip does at install), and the
    site-packages of the installed copy the timed processes run (``our_copy()``): with PYTHONPYCACHEPREFIX set, Python
    reads .pyc files only from the cache, never the ones pip wrote beside the sources."""
    import importlib.util  # noqa: PLC0415 - only the bench's set-up needs it

    folders = [our_copy().site_packages] if our_copy().site_packages else []
    for name in modules:
        spec = importlib.util.find_spec(name)
        folders += list(spec.submodule_search_locations or ()) if spec else []
    if folders:
        subprocess.run([sys.executable, "-m", "compileall", "-q", *folders], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --- the installed copy of ours that timed processes start -----------------------------------------------------
# An editable install (pip install -e) loads setuptools' finder from a .pth file in every interpreter, importing
# pathlib and urllib.parse (10-25 ms here), a start-up cost no user of `pip install .` pays. The timed processes
# run a regular install of the checkout instead, made once per bench run in a venv of its own.

REGULAR_INSTALL = "regular install of the checkout (wheel), as `pip install .`"
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_SHIPPED = ("benches", "tests")  # package folders of the checkout that the wheel does not hold


class InstallFailed(Exception):
    """The regular install could not be made; the message says why."""


@dataclass(frozen=True)
class Install:
    """The copy of vhdx that timed child processes start.

    Attributes:
        python: the interpreter for ``python -c`` children (``import vhdx``, the floor, the merge probe).
        vhdx: its ``vhdx`` console script (None when there is none).
        how: how this copy was installed, one line for the report.
        site_packages: the install's own site-packages folder (None: the running interpreter's copy).
        cwd: the folder children start in: ``python -c`` puts it first on sys.path, so a checkout there would
            shadow the installed vhdx.
    """

    python: str
    vhdx: str | None
    how: str
    site_packages: str | None = None
    cwd: str | None = None


_active: Install | None = None


def running_copy(why: str | None = None) -> Install:
    """What the benches ran before: the running interpreter and the ``vhdx`` on PATH (in a checkout, editable)."""
    how = "the running interpreter's copy of the checkout (as installed in it, e.g. `pip install -e`)"
    return Install(sys.executable, shutil.which("vhdx"), how + (f"; no regular install: {why}" if why else ""))


def our_copy() -> Install:
    """The copy timed processes start: the bench run's regular install, else the running interpreter's."""
    return _active or running_copy()


def run_ours(args: list[str], *, ok_codes=(0,)) -> dict:
    """``run_tool`` for a process of ours (or the floor beside it), started in ``our_copy().cwd``."""
    return run_tool(args, ok_codes=ok_codes, cwd=our_copy().cwd)


def _pip(*args: str) -> None:
    """Run pip offline (never the index); raises InstallFailed with pip's last line."""
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL)
    if done.returncode:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip() and "is ignored" not in line]
        # The build backend's own error line, not pip's framing around it ("subprocess-exited-with-error", hints).
        errors = [line for line in lines if "error" in line.lower() and "exited-with-error" not in line
                  and not line.startswith(("×", "╰", "note:", "hint:"))]
        raise InstallFailed(f"pip {args[0]}: " + (errors or lines or [f"exit {done.returncode}"])[0])


def build_wheel(folder: str) -> str:
    """Build the checkout's wheel into ``folder`` offline, from a copy of its sources; returns its path.

    The copy holds the checkout's top-level files and package folders (not benches/ nor tests/): setuptools
    writes build/ and *.egg-info where it builds, and a stale build/ of the checkout could ship deleted modules.
    """
    src = os.path.join(folder, "src")
    os.makedirs(src)
    for name in os.listdir(CHECKOUT):
        path = os.path.join(CHECKOUT, name)
        if name.startswith(".") or name in NOT_SHIPPED or os.path.islink(path):
            continue
        if os.path.isfile(path):
            shutil.copy2(path, src)
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            shutil.copytree(path, os.path.join(src, name), ignore=shutil.ignore_patterns("__pycache__"))
    # --no-build-isolation: the build requirements (setuptools>=77, in the bench and test extras) come from the
    # running environment, so nothing is downloaded.
    try:
        _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", folder, src)
    except InstallFailed as exc:
        raise InstallFailed(f"{exc} (building offline needs pyproject.toml's build requirements in the running "
                            "environment: pip install -e '.[bench]')") from exc
    wheels = [name for name in os.listdir(folder) if name.endswith(".whl")]
    if len(wheels) != 1:
        raise InstallFailed(f"pip wheel: expected one wheel, found {wheels}")
    return os.path.join(folder, wheels[0])


def regular_install(folder: str) -> Install:
    """Install the checkout's wheel with ``--no-deps`` into a new venv under ``folder``.

    The venv reuses the running interpreter's dependencies (numpy, click, construct, crc32c, ...) through a .pth
    file listing its site-packages folders: Python adds the listed folders to sys.path but does not process the
    .pth files inside them, so no editable finder or other start-up hook of the running environment is loaded.
    """
    home = os.path.join(folder, "venv")
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(home)
    python = os.path.join(home, "bin", "python")
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   capture_output=True, text=True, check=True, cwd=home).stdout.strip()
    running = [*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    if site.ENABLE_USER_SITE:
        running.append(site.getusersitepackages())
    listed = list(dict.fromkeys(p for p in running if os.path.isdir(p) and "\n" not in p))
    with open(os.path.join(site_packages, "_bench_dependencies.pth"), "w") as f:
        f.write("".join(f"{p}\n" for p in listed))
    _pip("--python", python, "install", "--no-deps", "-q", build_wheel(os.path.join(folder, "wheel")))
    install = Install(python, os.path.join(home, "bin", "vhdx"), REGULAR_INSTALL, site_packages, cwd=home)
    done = subprocess.run([python, "-c", "import vhdx, vhdx_cli.main, numpy, click, construct, crc32c; "
                                         "print(vhdx.__file__)"], capture_output=True, text=True, cwd=home)
    if done.returncode or not done.stdout.strip().startswith(site_packages + os.sep):
        raise InstallFailed(f"the installed copy does not import: {(done.stderr or done.stdout).strip()[-200:]}")
    if not os.access(install.vhdx, os.X_OK):
        raise InstallFailed("the wheel installed no vhdx console script")
    return install


@contextlib.contextmanager
def installed_copy(folder: str):
    """While inside, ``our_copy()`` is a regular install made under ``folder`` (untimed), else the running copy."""
    global _active
    saved = _active
    try:
        _active = regular_install(os.path.join(folder, "install"))
    except (InstallFailed, OSError, subprocess.CalledProcessError) as exc:
        _active = running_copy(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    try:
        yield _active
    finally:
        _active = saved
