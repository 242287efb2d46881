"""Acceptance: the README's two set-up commands work in a fresh clone, with no ../shared and no environment.

Slow (it creates two virtual environments and installs the package twice); run with ``-m slow``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS_USE = re.compile(r"corpus_image|corpus_file|\bCORPUS\b")


def readme_commands(readme: str) -> list[str]:
    """The shell lines of the README's Quick start code blocks, in order."""
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def clean_env(home: Path) -> dict[str, str]:
    """No project variables (VHDX_CORPUS, HYPOTHESIS_PROFILE, ...): only PATH, HOME and this machine's pip index."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})  # how this host reaches its index
    return env


def test_readme_quick_start_has_exactly_the_two_set_up_commands():
    commands = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))
    assert commands == ["python3 -m venv .venv && . .venv/bin/activate && pip install .", "bash .ci/run"]


@pytest.mark.slow
def test_readme_set_up_in_a_fresh_clone_runs_corpus_tests_with_nothing_skipped(tmp_path):
    if shutil.which("git") is None:
        pytest.fail("git is needed to clone the repository")
    clone, home = tmp_path / "clone", tmp_path / "home"
    home.mkdir()
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, env=clean_env(home))
    assert not (clone.parent / "shared").exists()
    env = clean_env(home)
    setup, run_tests = readme_commands((clone / "README.md").read_text(encoding="utf-8"))

    done = subprocess.run(["bash", "-c", f"{setup} && vhdx --version"], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "version" in done.stdout

    # Every test module that reads the corpus, through the README's second command (which passes its arguments
    # on to pytest); -rs lists each skip with its reason.
    modules = sorted(str(p.relative_to(clone)) for p in (clone / "tests").rglob("test_*.py")
                     if CORPUS_USE.search(p.read_text(encoding="utf-8")))
    assert "tests/test_corpus.py" in modules
    done = subprocess.run(["bash", "-c", f"{run_tests} -rs {' '.join(modules)}"], cwd=clone,
                          env=env, capture_output=True, text=True, timeout=1800)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert re.search(r"\d+ passed", out), out[-2000:]
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert [line for line in skips if re.search(r"corpus|shared|VHDX_CORPUS", line, re.I)] == []
