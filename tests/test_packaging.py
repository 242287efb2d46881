"""The wheel ships every package directory of the library, the CLI and the fixtures, and never the benches."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
# Source directory -> the name it installs under (pyproject's package-dir).
SHIPPED = {"vhdx": "vhdx", "cli": "vhdx_cli", "fixtures": "vhdx_fixtures"}


def source_packages() -> dict[str, Path]:
    """Every directory holding .py files under a shipped source directory, as installed package name -> path."""
    found = {}
    for source, installed in SHIPPED.items():
        for folder, dirs, files in os.walk(ROOT / source):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if any(f.endswith(".py") for f in files):
                rel = Path(folder).relative_to(ROOT / source)
                found[".".join([installed, *rel.parts])] = Path(folder)
    return found


def setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_pyproject_declares_every_package_directory():
    assert sorted(set(source_packages()) - set(setuptools_config()["packages"])) == []


def test_pyproject_declares_no_package_without_a_directory():
    assert sorted(set(setuptools_config()["packages"]) - set(source_packages())) == []


def test_benches_are_not_shipped():
    config = setuptools_config()
    assert "benches" not in config["package-dir"].values()
    assert not [p for p in config["packages"] if "bench" in p.split(".")[0]]


def test_no_shipped_module_imports_the_benches():
    offenders = [str(p.relative_to(ROOT)) for source in SHIPPED for p in (ROOT / source).rglob("*.py")
                 if "import benches" in p.read_text() or "from benches" in p.read_text()
                 or "vhdx_benches" in p.read_text()]
    assert offenders == []


def wheel_modules(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return {name for name in zf.namelist() if name.endswith(".py")}


def expected_modules() -> set[str]:
    return {"/".join([*name.split("."), f.name]) for name, folder in source_packages().items()
            for f in folder.glob("*.py")}


@pytest.mark.slow  # builds the wheel (about 15 s); .ci/run builds it once and passes it in VHDX_WHEEL
def test_built_wheel_holds_every_module_and_no_benches(tmp_path):
    given = os.environ.get("VHDX_WHEEL")
    if given:
        wheel = Path(given)
    else:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp_path)],
                       check=True, capture_output=True)
        wheel = next(tmp_path.glob("*.whl"))
    shipped = wheel_modules(wheel)
    assert sorted(expected_modules() - shipped) == []
    assert [name for name in shipped if name.split("/")[0] in ("benches", "vhdx_benches", "tests")] == []
