"""A folder on a file system that shares extents (an XFS loop mount with reflink=1), for the reflink tests.

Building it needs root, ``mkfs.xfs`` (xfsprogs) and loop devices; where any is missing the tests that ask for
it are skipped with the reason. The copy path is tested everywhere else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def reflink_unavailable() -> str | None:
    """Why an XFS loop mount cannot be built here (None: it can be tried)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to mount an XFS loop device"
    for tool in ("mkfs.xfs", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (xfsprogs / util-linux)"
    return None


def mount_xfs(folder: Path, size: str = "2G") -> Path:
    """Make and mount an XFS image with reflink=1 under ``folder``; returns the mount point (skips on failure)."""
    reason = reflink_unavailable()
    if reason:
        pytest.skip(f"reflink path not tested: {reason}")
    image, mnt = folder / "xfs.img", folder / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    made = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"reflink path not tested: mkfs.xfs failed: {made.stderr.strip()}")
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"reflink path not tested: cannot mount a loop device: {mounted.stderr.strip()}")
    return mnt


def unmount(mnt: Path) -> None:
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    (mnt.parent / "xfs.img").unlink(missing_ok=True)


def shared_bytes(path) -> int:
    """Bytes of ``path`` in extents FIEMAP flags as shared (``filefrag -v``, 4 KiB units as it prints them)."""
    out = subprocess.run(["filefrag", "-v", "-b4096", str(path)], capture_output=True, text=True, check=True).stdout
    total = 0
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(":")]
        if len(parts) >= 5 and parts[0].isdigit() and "shared" in line:
            total += int(parts[3].split()[0]) * 4096 if parts[3].split() else 0
    return total
