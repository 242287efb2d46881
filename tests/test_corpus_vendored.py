"""The real-image corpus is vendored complete in tests/corpus: a fresh clone tests fully, nothing skips for it."""

from __future__ import annotations

import ast
import gzip
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.corpus import MANIFEST, VENDORED, corpus_file, manifest_entries

REPO = Path(__file__).resolve().parents[1]
CORPUS_WORDS = re.compile(r"corpus|VHDX_CORPUS|shared", re.IGNORECASE)
SKIP_CALLS = {"skip", "skipif", "importorskip", "xfail"}


def sha256_and_size(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


@pytest.mark.parametrize("entry", manifest_entries(), ids=lambda e: e.stored)
def test_every_manifest_file_is_vendored_with_its_recorded_sha256(entry):
    path = VENDORED / entry.stored
    assert path.is_file(), f"{entry.stored} is listed in MANIFEST.md but not vendored"
    data = path.read_bytes()
    if entry.of_decompressed:
        data = gzip.decompress(data)
    digest, size = sha256_and_size(data)
    assert digest == entry.sha256
    if entry.size is not None:
        assert size == entry.size


def test_every_vendored_file_is_listed_in_the_manifest():
    listed = {entry.stored for entry in manifest_entries()}
    vendored = {str(p.relative_to(VENDORED)) for p in VENDORED.rglob("*") if p.is_file() and p != MANIFEST}
    assert vendored - listed == set(), "vendored without provenance"
    assert len(listed) >= 30


def test_a_missing_corpus_file_fails_the_test_instead_of_skipping():
    with pytest.raises(pytest.fail.Exception, match="missing"):
        corpus_file("no-such-source/absent.vhdx.gz")


def skip_calls_about_the_corpus(source: str) -> list[str]:
    """Source text of every pytest skip/skipif/importorskip/xfail call that mentions the corpus or ../shared."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            text = ast.get_source_segment(source, node) or ""
            if name in SKIP_CALLS and CORPUS_WORDS.search(text):
                found.append(text)
    return found


def test_the_skip_scanner_finds_a_corpus_skip():
    planted = 'import pytest\nif not CORPUS.exists():\n    pytest.skip(f"corpus not found at {CORPUS}")\n'
    assert skip_calls_about_the_corpus(planted)
    assert not skip_calls_about_the_corpus('import pytest\npytest.skip("qemu-img is not installed")\n')


def test_no_test_skips_for_a_missing_corpus():
    offenders = {}
    for path in [*sorted((REPO / "tests").rglob("*.py")), *sorted((REPO / "fixtures").rglob("*.py"))]:
        if path == Path(__file__).resolve():
            continue
        calls = skip_calls_about_the_corpus(path.read_text(encoding="utf-8"))
        if calls:
            offenders[str(path.relative_to(REPO))] = calls
    assert offenders == {}


def test_the_corpus_is_found_without_environment_variables_or_shared_folder():
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    code = "from tests.support.corpus import CORPUS; print(CORPUS)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == VENDORED
    assert "shared" not in VENDORED.relative_to(REPO).parts
