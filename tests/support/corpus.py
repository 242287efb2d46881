"""Where the real-image corpus lives: vendored in tests/corpus, so a fresh clone tests fully.

``VHDX_CORPUS`` points elsewhere (e.g. a larger private collection with the same layout). A vendored file that is
missing is a broken checkout, so tests fail on it instead of skipping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

CORPUS = Path(os.environ.get("VHDX_CORPUS", Path(__file__).resolve().parents[1] / "corpus"))


def corpus_file(name: str) -> Path:
    """Path of corpus file NAME (relative to the corpus folder); fails the test when it is absent."""
    path = CORPUS / name
    if not path.exists():
        pytest.fail(f"corpus file {path} is missing (it is vendored in tests/corpus)")
    return path


VENDORED = Path(__file__).resolve().parents[1] / "corpus"
MANIFEST = VENDORED / "MANIFEST.md"


@dataclass(frozen=True)
class ManifestEntry:
    """One file the MANIFEST lists: where it is stored and the sha256/size recorded for it."""

    stored: str  # path relative to the corpus folder, as stored (compressed)
    sha256: str
    size: int | None
    of_decompressed: bool  # sha256/size are of the gzip-decompressed file (the dfvfs table), not of the stored one


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def manifest_entries(manifest: Path = MANIFEST) -> list[ManifestEntry]:
    """Every row of the MANIFEST's file tables (the tables whose first column is 'file ...')."""
    entries, header = [], None
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = cells
            continue
        if set(line) <= set("|-: ") or not header[0].startswith("file"):
            continue
        sha_col = next(i for i, h in enumerate(header) if h.startswith("sha256"))
        size_col = next((i for i, h in enumerate(header) if h.startswith("size")), None)
        of_decompressed = "stored here as .gz" in header[0]
        entries.append(ManifestEntry(
            stored=cells[0] + (".gz" if of_decompressed else ""), sha256=cells[sha_col],
            size=int(cells[size_col]) if size_col is not None else None, of_decompressed=of_decompressed))
    return entries
