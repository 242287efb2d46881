"""The package's front door: lazy public names, no name hiding a module, cheap start-up."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import vhdx
import vhdx.errors
from vhdx.hyperv import errors as hyperv_errors

PACKAGE_DIR = Path(vhdx.__file__).parent
HEAVY = ("numpy", "vhdx.ops.merge")


def run_fresh(code: str) -> tuple[set[str], str]:
    """The modules a fresh interpreter running ``code`` loaded (printed last, as JSON), and what it printed before."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    *printed, modules = done.stdout.strip().splitlines()
    return set(json.loads(modules)), "\n".join(printed)


def loaded_after(code: str) -> set[str]:
    return run_fresh(code)[0]


def cli_code(*args: str) -> str:
    """Python that runs ``vhdx ARGS`` through the click group and fails on a non-zero exit."""
    return (f"import sys\nfrom vhdx_cli.main import cli\nsys.argv = {['vhdx', *args]!r}\n"
            "try:\n    cli()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code")


def heavy_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def all_submodules() -> list[str]:
    return [info.name for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="vhdx.")]


def test_import_vhdx_loads_neither_numpy_nor_the_merge_engine():
    assert heavy_in(loaded_after("import vhdx")) == []


def test_import_format_constants_loads_neither_numpy_nor_the_merge_engine():
    assert heavy_in(loaded_after("import vhdx.format.constants")) == []


def test_vhdx_version_imports_neither_numpy_nor_the_merge_engine():
    code = ("import sys\nfrom vhdx_cli.main import cli\nsys.argv = ['vhdx', '--version']\n"
            "try:\n    cli()\nexcept SystemExit:\n    pass")
    modules = loaded_after(code)
    assert "vhdx_cli.main" in modules
    assert heavy_in(modules) == []


def test_vhdx_info_does_not_import_the_merge_engine_check_or_convert(tmp_path):
    path = tmp_path / "small.vhdx"
    vhdx.create_image(path, 8 << 20)
    modules = loaded_after(cli_code("info", str(path)))
    assert "vhdx.ops.inspect" in modules
    assert [m for m in modules if m.startswith(("vhdx.ops.merge", "vhdx.ops.check", "vhdx.ops.convert"))] == []


def test_vhdx_info_of_an_empty_disk_does_not_import_numpy(tmp_path):
    path = tmp_path / "empty.vhdx"
    vhdx.create_image(path, 8 << 20)
    modules, printed = run_fresh(cli_code("info", str(path)))
    assert "NOT_PRESENT: 1" in printed
    assert "numpy" not in modules


def _qemu_style_disk(path: Path, written: tuple[int, ...] = ()) -> int:
    """A 1 TiB disk whose BAT is every payload entry ZERO, as qemu-img writes it (large enough to be judged on the
    scan's threads), with the blocks ``written`` fully present, filled with their number; returns the blocks."""
    import numpy as np

    from vhdx.format import constants as c

    vhdx.create_image(path, 1 << 40, block_size=1 << 20)
    with vhdx.open(path) as image:
        layer = image.layers[0]
        bat_offset, geometry = layer.regions.bat.file_offset, layer.geometry
    stride = geometry.chunk_ratio + 1
    entries = np.full(geometry.bat_entries, c.BatState.ZERO, dtype="<u8")
    entries[stride - 1 :: stride] = 0
    with open(path, "r+b") as f:
        end = -(-f.seek(0, 2) // (1 << 20)) * (1 << 20)
        for block in written:
            f.seek(end)
            f.write(bytes([block % 251 + 1]) * geometry.block_size)
            entries[geometry.payload_index(block)] = end | c.BatState.FULLY_PRESENT
            end += geometry.block_size
        f.seek(bat_offset)
        f.write(entries.tobytes())
    return geometry.data_blocks


def test_vhdx_info_of_a_bat_of_zero_entries_on_many_windows_does_not_import_numpy(tmp_path):
    path = tmp_path / "zero-bat.vhdx"
    blocks = _qemu_style_disk(path)
    modules, printed = run_fresh(cli_code("info", str(path)))
    assert f"ZERO: {blocks}" in printed
    assert "numpy" not in modules


def test_vhdx_info_of_a_bat_of_zero_entries_with_a_few_blocks_written_does_not_import_numpy(tmp_path):
    """The written blocks are the few exceptions of their windows, judged one by one; the first is block 0."""
    path = tmp_path / "zero-bat-written.vhdx"
    written = (0, 1, 300_000, (1 << 20) - 1)
    blocks = _qemu_style_disk(path, written)
    modules, printed = run_fresh(cli_code("info", str(path)))
    assert f"ZERO: {blocks - len(written)}" in printed and f"FULLY_PRESENT: {len(written)}" in printed
    assert "numpy" not in modules
    with vhdx.open(path) as image:
        for block in written:
            assert image.read(block << 20, 4096) == bytes([block % 251 + 1]) * 4096


def test_vhdx_create_of_a_64_tib_dynamic_disk_does_not_import_numpy(tmp_path):
    path = tmp_path / "new.vhdx"
    modules = loaded_after(cli_code("create", "--size", "64T", str(path)))
    assert "vhdx.ops.create" in modules
    assert "numpy" not in modules
    with vhdx.open(path) as image:
        assert image.virtual_size == 64 << 40


def test_every_public_name_resolves_and_is_listed():
    for name in vhdx.__all__:
        assert getattr(vhdx, name) is not None
        assert name in dir(vhdx)


def test_open_is_the_alias_of_open_image():
    assert vhdx.open is vhdx.open_image


def test_public_names_are_the_documented_verbs():
    for name in ("open_image", "create_image", "merge_chain", "abort_merge", "flatten", "check_image",
                 "repair_image", "set_parent"):
        assert callable(getattr(vhdx, name)), name


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = vhdx.no_such_name


@pytest.mark.parametrize("name", ["create", "merge", "check", "repair", "convert", "relink", "inspect"])
def test_old_function_names_are_not_attributes_of_vhdx(name):
    assert not callable(getattr(vhdx, name, None))


def test_no_public_name_is_also_the_name_of_a_submodule():
    leaf_names = {name.rsplit(".", 1)[-1] for name in all_submodules()}
    assert sorted(set(vhdx.__all__) & leaf_names) == []


def test_no_attribute_of_a_package_shadows_its_submodule():
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="vhdx."):
        parent_name, _, leaf = info.name.rpartition(".")
        parent = importlib.import_module(parent_name)
        module = importlib.import_module(info.name)
        assert getattr(parent, leaf) is module, f"{parent_name}.{leaf} is not the module {info.name}"


def test_submodules_are_reachable_as_attributes_without_importing_them():
    code = "import vhdx\nassert vhdx.ops.__name__ == 'vhdx.ops'"
    assert "vhdx.ops" in loaded_after(code)


def test_hyperv_errors_live_in_vhdx_hyperv_and_are_vhdx_errors():
    names = ["HyperVError", "HyperVUnavailableError", "HyperVAccessDeniedError", "VmNotFoundError",
             "CheckpointNotFoundError", "HyperVJobFailedError", "HyperVTimeoutError"]
    for name in names:
        assert issubclass(getattr(hyperv_errors, name), vhdx.errors.VhdxError)
        assert not hasattr(vhdx.errors, name), f"{name} is still in vhdx.errors"


def _constructed_names() -> set[str]:
    """Names called anywhere in the library outside vhdx/errors.py (``SomeError(...)``)."""
    called = set()
    for path in PACKAGE_DIR.rglob("*.py"):
        if path == PACKAGE_DIR / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called.add(func.id if isinstance(func, ast.Name) else getattr(func, "attr", None))
    return called


def test_every_leaf_error_class_is_raised_somewhere_in_the_library():
    classes = [obj for obj in vars(vhdx.errors).values()
               if isinstance(obj, type) and issubclass(obj, vhdx.errors.VhdxError)]
    leaves = [cls for cls in classes if not any(other is not cls and issubclass(other, cls) for other in classes)]
    assert sorted(cls.__name__ for cls in leaves if cls.__name__ not in _constructed_names()) == []


def test_hypothesis_strategies_live_in_the_fixtures_package_not_the_library():
    assert importlib.util.find_spec("vhdx.testing") is None
    assert callable(importlib.import_module("vhdx_fixtures.strategies").chain_specs)
    assert not [m for m in all_submodules() if "hypothesis" in Path(importlib.util.find_spec(m).origin).read_text()]


def test_vhdx_check_in_a_fresh_process_reports_an_interrupted_merge(tmp_path):
    # The interrupted-merge check must not depend on some earlier import having loaded the merge engine.
    path = tmp_path / "base.vhdx"
    vhdx.create_image(path, 8 << 20)
    (tmp_path / "base.vhdx.merge-journal").write_text("{not json")
    code = (f"import sys\nfrom vhdx_cli.main import cli\nsys.argv = ['vhdx', 'check', '--json', {str(path)!r}]\n"
            "cli()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "MERGE_INTERRUPTED" in done.stdout, done.stdout + done.stderr
