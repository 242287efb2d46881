"""Start-up cost (issue 15, item 2): what a fresh process imports for each command, and the crc32c loader."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import crc32c as crc32c_package
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vhdx
from vhdx.format import checksum


def loaded_after(code: str) -> set[str]:
    """Modules loaded by a fresh interpreter that runs ``code`` (then prints sys.modules as JSON)."""
    script = f"{code}\nimport sys\nprint(repr(sorted(sys.modules)))"  # repr: importing json would taint the list
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return set(ast.literal_eval(done.stdout.strip().splitlines()[-1]))


def loaded_by_command(*args: str) -> set[str]:
    """Modules loaded by ``vhdx ARGS`` run in a fresh interpreter (the command must succeed)."""
    code = (f"import sys\nfrom vhdx_cli.main import cli\nsys.argv = ['vhdx', *{list(args)!r}]\n"
            "try:\n    cli()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code")
    return loaded_after(code)


def among(modules: set[str], *names: str) -> list[str]:
    """The modules of ``modules`` that are one of ``names`` or inside one of them."""
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


# --- crc32c ---------------------------------------------------------------------------------------------------


def test_checksum_module_does_not_import_importlib_metadata():
    assert among(loaded_after("import vhdx.format.checksum"), "importlib.metadata") == []


def test_checksum_crc32c_is_the_packages_c_function():
    # Loaded from the package's extension, not a slower stand-in.
    assert type(checksum.crc32c).__name__ == "builtin_function_or_method"
    assert checksum.crc32c.__module__ == crc32c_package.crc32c.__module__


def test_checksum_crc32c_of_123456789_is_the_catalogued_check_value():
    assert checksum.crc32c(b"123456789") == 0xE3069283


@given(st.binary(max_size=4096), st.integers(0, 0xFFFFFFFF))
def test_checksum_crc32c_equals_the_crc32c_package(data, start):
    assert checksum.crc32c(data) == crc32c_package.crc32c(data)
    assert checksum.crc32c(data, start) == crc32c_package.crc32c(data, start)


def test_checksum_loader_falls_back_to_the_package_when_the_extension_cannot_be_found(monkeypatch):
    monkeypatch.setattr(checksum.importlib.util, "find_spec", lambda name: None)
    assert checksum._load_crc32c() is crc32c_package.crc32c


def test_checksum_loader_falls_back_to_the_package_when_the_folder_has_no_extension(monkeypatch, tmp_path):
    (tmp_path / "__init__.py").write_text("")
    fake = checksum.importlib.util.spec_from_file_location("crc32c", tmp_path / "__init__.py",
                                                            submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(checksum.importlib.util, "find_spec", lambda name: fake)
    assert checksum._load_crc32c() is crc32c_package.crc32c


# --- what each command imports ----------------------------------------------------------------------------------

WRITING = ("vhdx.disk.writer", "vhdx.structures.commit", "vhdx.structures.log_build", "vhdx.ops.merge",
           "vhdx.ops.repair", "vhdx.ops.resize")
DIRTY_LOG_ONLY = ("vhdx.structures.log_rules",)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("startup") / "small.vhdx"
    vhdx.create_image(path, 16 << 20)
    return str(path)


def test_vhdx_info_imports_no_writer_commit_merge_nor_importlib_metadata(small):
    modules = loaded_by_command("info", small)
    assert "vhdx.ops.inspect" in modules
    assert among(modules, *WRITING, "importlib.metadata") == []


# --- the start-up bench -----------------------------------------------------------------------------------------


def test_startup_bench_children_use_a_bytecode_cache_and_the_environment_is_restored(tmp_path, monkeypatch):
    from benches import cases_startup

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    folder = tmp_path / "pycache"
    with cases_startup.bytecode_cache(str(folder)):
        subprocess.run([sys.executable, "-c", "import vhdx.format.constants"], check=True)
    assert list(folder.rglob("constants*.pyc"))
    assert "PYTHONPYCACHEPREFIX" not in os.environ
    assert os.environ["PYTHONDONTWRITEBYTECODE"] == "1"


# --- the command line's lazy commands ---------------------------------------------------------------------------


def _group_with_probe_command(tmp_path, monkeypatch):
    """A group whose lazy command ``probe`` lives in a new module that records whether the GC ran at import."""
    from vhdx_cli.common import OneLineErrorGroup

    (tmp_path / "startup_probe_cmd.py").write_text(
        "import gc\nimport click\nGC_ON_AT_IMPORT = gc.isenabled()\n\n"
        "@click.command()\ndef probe():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "startup_probe_cmd", raising=False)
    group = OneLineErrorGroup()
    group.lazy_commands["probe"] = "startup_probe_cmd:probe"
    return group


def test_lazy_command_module_is_imported_with_the_gc_paused_and_the_gc_is_on_again_after(tmp_path, monkeypatch):
    import gc

    group = _group_with_probe_command(tmp_path, monkeypatch)
    assert gc.isenabled()
    assert group.get_command(None, "probe").name == "probe"
    assert sys.modules["startup_probe_cmd"].GC_ON_AT_IMPORT is False
    assert gc.isenabled()


def test_lazy_command_import_leaves_a_disabled_gc_disabled(tmp_path, monkeypatch):
    import gc

    group = _group_with_probe_command(tmp_path, monkeypatch)
    gc.disable()
    try:
        group.get_command(None, "probe")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_vhdx_info_does_not_import_json_without_the_json_flag(small):
    assert "json" not in loaded_by_command("info", small)


def test_vhdx_info_json_still_prints_json(small):
    done = subprocess.run([sys.executable, "-m", "vhdx_cli.main", "info", "--json", small], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["virtual_size"] == 16 << 20


def test_dataclasses_that_vhdx_info_loads_have_their_own_docstring(small):
    # Without one, @dataclass computes a docstring from inspect.signature at import: start-up cost of every command.
    code = (f"import sys\nfrom vhdx_cli.main import cli\nsys.argv = ['vhdx', 'info', {small!r}]\n"
            "try:\n    cli()\nexcept SystemExit:\n    pass\n"
            "import dataclasses\n"
            "bare = sorted(f'{name}.{key}' for name, module in list(sys.modules.items()) if name.startswith('vhdx')\n"
            "              for key, value in vars(module).items() if isinstance(value, type)\n"
            "              and value.__module__ == name and dataclasses.is_dataclass(value)\n"
            "              and (value.__doc__ or '').startswith(key + '('))\n"
            "print('BARE', bare)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "BARE []"


def test_one_shot_group_moves_what_the_import_made_to_the_permanent_generation(tmp_path, monkeypatch):
    # The console process runs one command: what the import built lives until exit, so collections during the
    # command (and the last one, at exit) need not walk it again.
    import gc

    group = _group_with_probe_command(tmp_path, monkeypatch)
    group.one_shot = True
    try:
        group.get_command(None, "probe")
        assert gc.get_freeze_count() > 0
        assert gc.isenabled()
    finally:
        gc.unfreeze()


def test_library_use_of_the_group_freezes_nothing(tmp_path, monkeypatch):
    import gc

    group = _group_with_probe_command(tmp_path, monkeypatch)
    before = gc.get_freeze_count()
    group.get_command(None, "probe")
    assert gc.get_freeze_count() == before


def test_console_entry_runs_the_group_one_shot(small):
    code = (f"import atexit, gc, sys\natexit.register(lambda: print('FROZEN', gc.get_freeze_count() > 0))\n"
            f"from vhdx_cli.main import main\nsys.argv = ['vhdx', 'info', {small!r}]\nmain()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "FROZEN True"


def test_the_vhdx_console_script_is_the_one_shot_entry():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["vhdx"] == "vhdx_cli.main:main"


def test_log_building_names_stay_reachable_from_the_log_module():
    from vhdx.structures import log, log_build

    assert (log.DataWrite, log.ZeroWrite, log.build_entry) == (log_build.DataWrite, log_build.ZeroWrite,
                                                                log_build.build_entry)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = log.no_such_name


def test_chain_description_names_stay_reachable_from_inspect():
    from vhdx.ops import chain_info, inspect

    assert (inspect.LayerInfo, inspect.ChainInfo, inspect.describe_chain) == (
        chain_info.LayerInfo, chain_info.ChainInfo, chain_info.describe_chain)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = inspect.no_such_name


def test_vhdx_info_does_not_build_the_chain_descriptions(small):
    assert "vhdx.ops.chain_info" not in loaded_by_command("info", small)


def test_vhdx_chain_still_lists_the_layer(small):
    done = subprocess.run([sys.executable, "-m", "vhdx_cli.main", "chain", "--json", small], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert [layer["path"] for layer in json.loads(done.stdout)["layers"]] == [small]


def test_vhdx_info_of_a_clean_log_does_not_load_the_log_replay_rules(small):
    assert among(loaded_by_command("info", small), *DIRTY_LOG_ONLY) == []


READ_ONLY = [["map"], ["chain"], ["check"], ["convert", "-O", "raw"]]


@pytest.mark.parametrize("command", READ_ONLY, ids=lambda args: args[0])
def test_read_only_commands_load_no_writer_repair_resize_or_merge_engine(small, tmp_path, command):
    args = [*command, small] + ([str(tmp_path / "out.raw")] if command[0] == "convert" else [])
    modules = loaded_by_command(*args)
    # check reads an interrupted merge's journal (vhdx.ops.merge.journal), never the engine that runs merges.
    engine = [m for m in among(modules, "vhdx.ops.merge") if m not in ("vhdx.ops.merge", "vhdx.ops.merge.journal")]
    assert among(modules, *[w for w in WRITING if w != "vhdx.ops.merge"], "importlib.metadata") + engine == []
