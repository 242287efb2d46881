"""Fixtures of the forensic tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.forensics.helpers import MiB, build_chain, pattern


@pytest.fixture
def small_chain(tmp_path) -> list[Path]:
    """base (1 MiB blocks) -> child -> grandchild, with data, a partial block, a ZERO block and an UNMAPPED block."""
    return build_chain(tmp_path, [
        [("write", 0, pattern(1, 3 * MiB)), ("write", 5 * MiB, pattern(2, MiB))],
        [("write", 4096, pattern(3, 1024)), ("write", 2 * MiB, pattern(4, MiB)), ("zero", 5 * MiB, MiB)],
        [("write", 7 * MiB + 512, pattern(5, 2048)), ("discard", 1 * MiB, MiB)],
    ])
