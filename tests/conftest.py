"""Shared test setup: hypothesis profiles and the real-image corpus vendored in tests/corpus."""

from __future__ import annotations

import bz2
import gzip
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.support.corpus import CORPUS, corpus_file  # noqa: F401  (CORPUS re-exported for tests)

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=100_000, deadline=None,
                          suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Folder where corpus images are decompressed (once per session)."""
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="session")
def corpus_image(corpus_dir):
    """corpus_image("dfvfs/fat-parent.vhdx.gz") -> path of the decompressed image (cached per session)."""

    def get(name: str) -> Path:
        src = corpus_file(name)
        dest = corpus_dir / name
        for suffix in (".gz", ".bz2"):
            if name.endswith(suffix):
                dest = corpus_dir / name[: -len(suffix)]
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            opener = gzip.open if name.endswith(".gz") else bz2.open if name.endswith(".bz2") else open
            with opener(src, "rb") as fin, open(dest, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        return dest

    return get
