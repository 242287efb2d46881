"""Where the real-image corpus lives: vendored in tests/corpus, so a fresh clone tests fully.

``VHDX_CORPUS`` points elsewhere (e.g. a larger private collection with the same layout). A vendored file that is
missing is a broken checkout, so tests fail on it instead of skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CORPUS = Path(os.environ.get("VHDX_CORPUS", Path(__file__).resolve().parents[1] / "corpus"))


def corpus_file(name: str) -> Path:
    """Path of corpus file NAME (relative to the corpus folder); fails the test when it is absent."""
    path = CORPUS / name
    if not path.exists():
        pytest.fail(f"corpus file {path} is missing (it is vendored in tests/corpus)")
    return path
