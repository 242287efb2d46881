"""List the trees to scan: disks and merge journals grouped by directory, VM configurations, everything else counted.

Only directory entries are read here (no file is opened). Symbolic links that lead out of the roots are
skipped and listed unless asked to follow them; links inside the roots are skipped because their targets are
scanned under their own paths. Every directory is entered once (a link loop cannot make the walk endless).
Devices, FIFOs and sockets are counted and never opened.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from vhdx.fleet.probe import kind_of

BATCH_FILES = 64  # files per probe task: small enough to spread, big enough to amortise a task's cost


@dataclass
class WalkReport:
    """What the walk saw besides the files it hands out for probing."""

    vm_configs: list[str] = field(default_factory=list)
    other_files: int = 0
    special_files: list[str] = field(default_factory=list)  # devices, FIFOs, sockets
    skipped_links: list[str] = field(default_factory=list)  # out of the roots, or dangling
    unreadable_dirs: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


@dataclass(frozen=True)
class Batch:
    """Files of one directory to probe in one task."""

    directory: str
    disks: tuple[str, ...]
    journals: tuple[str, ...]


def _inside(real: str, roots: list[str]) -> bool:
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


class Walker:
    def __init__(self, roots, *, follow_symlinks: bool = False, batch_files: int = BATCH_FILES) -> None:
        self.roots = [os.path.abspath(os.fspath(r)) for r in roots]
        self.real_roots = [os.path.realpath(r) for r in self.roots]
        self.follow_symlinks = follow_symlinks
        self.batch_files = batch_files
        self.report = WalkReport()
        self._seen_dirs: set[tuple[int, int]] = set()

    def batches(self) -> Iterator[Batch]:
        """Batches of files to probe, directory by directory, in a stable (sorted) order."""
        loose = []  # files given as roots
        for root in self.roots:
            try:
                st = os.stat(root)
            except OSError as exc:
                self.report.unreadable_dirs.append((root, exc.strerror or str(exc)))
                continue
            if stat.S_ISDIR(st.st_mode):
                yield from self._walk(root)
            else:
                loose.append(root)
        if loose:
            yield from self._group(os.path.dirname(loose[0]), loose)

    def _walk(self, top: str) -> Iterator[Batch]:
        stack = [top]
        while stack:
            directory = stack.pop()
            try:
                st = os.stat(directory)
                if (st.st_dev, st.st_ino) in self._seen_dirs:
                    continue
                self._seen_dirs.add((st.st_dev, st.st_ino))
                with os.scandir(directory) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                self.report.unreadable_dirs.append((directory, exc.strerror or str(exc)))
                continue
            files, subdirs = [], []
            for entry in entries:
                self._sort_entry(entry, files, subdirs)
            stack.extend(reversed(subdirs))
            yield from self._group(directory, files)

    def _sort_entry(self, entry: os.DirEntry, files: list[str], subdirs: list[str]) -> None:
        try:
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
                if not os.path.exists(real):
                    self.report.skipped_links.append(entry.path)  # dangling: nothing to scan
                    return
                if _inside(real, self.real_roots):
                    return  # the target is scanned under its own path
                if not self.follow_symlinks:
                    self.report.skipped_links.append(entry.path)
                    return
                mode = os.stat(real).st_mode
                is_dir, is_file = stat.S_ISDIR(mode), stat.S_ISREG(mode)
            else:  # the directory entry's type: no system call per file
                is_dir, is_file = entry.is_dir(follow_symlinks=False), entry.is_file(follow_symlinks=False)
        except OSError:
            self.report.skipped_links.append(entry.path)
            return
        if is_dir:
            subdirs.append(entry.path)
        elif is_file:
            files.append(entry.path)
        else:
            self.report.special_files.append(entry.path)

    def _group(self, directory: str, files: list[str]) -> Iterator[Batch]:
        disks, journals = [], []
        for path in files:
            kind = kind_of(os.path.basename(path))
            if kind == "disk":
                disks.append(path)
            elif kind == "journal":
                journals.append(path)
            elif kind == "vm_config":
                self.report.vm_configs.append(path)
            else:
                self.report.other_files += 1
        n = self.batch_files
        for i in range(0, max(len(disks), 1), n):
            if disks[i : i + n] or (i == 0 and journals):
                yield Batch(directory, tuple(disks[i : i + n]), tuple(journals) if i == 0 else ())
