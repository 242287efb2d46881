"""Strings from files are data, not output: locator paths, key names and creator strings reach the terminal
escaped (no raw control characters or ANSI sequences), and a candidate parent that is not a VHDX is named
without quoting its bytes (a locator may point at /etc/passwd or /etc/shadow).
"""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

import vhdx
from vhdx.format import constants as c
from vhdx.ops.check import check_image
from vhdx.ops.create import create
from vhdx.structures.metadata import MetadataItem, build_parent_locator, read_items
from vhdx_cli.main import cli

MiB = 1 << 20
ESC = "\x1b"
# A path that clears the screen, sets a window title and rings the bell, with a carriage return and a C1 CSI.
HOSTILE = "\x1b[2J\x1b]0;pwned\x07evil\r\x9b31m\\parent.vhdx"


def set_locator(child, entries) -> None:
    with vhdx.open(child, writable=True, orphan=True) as image:
        items = [MetadataItem(i.item_id, i.flags, build_parent_locator(entries))
                 if i.item_id == c.PARENT_LOCATOR_GUID else i for i in read_items(image.io, image.metadata)]
        image.writer.begin(changes_data=False)
        image.writer.rewrite_metadata(items)


@pytest.fixture
def child(tmp_path):
    base = tmp_path / "base.vhdx"
    create(base, 4 * MiB, block_size=MiB)
    path = tmp_path / "child.avhdx"
    create(path, parent=base, creator="tool\x1b[31m red\x07")
    os.remove(base)
    return path


def linkage(path) -> str:
    with vhdx.open(path, orphan=True) as image:
        return dict(image.params.parent_locator.entries)[c.PARENT_LINKAGE_KEY]


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.output + (result.stderr if result.stderr_bytes is not None else "")


def assert_no_control_characters(text: str) -> None:
    bad = sorted({ch for ch in text if (ord(ch) < 0x20 and ch != "\n") or 0x7F <= ord(ch) < 0xA0})
    assert not bad, f"raw control characters {bad!r} in {text[:300]!r}"


@pytest.mark.parametrize("command", [["info"], ["chain"], ["check"], ["check", "--chain"], ["map"], ["hash"],
                                     ["info", "--json"], ["repair", "--dry-run"], ["slack"], ["diff"]])
def test_hostile_locator_and_creator_are_escaped_in_every_output(child, command):
    set_locator(child, [(c.PARENT_LINKAGE_KEY, linkage(child)), (c.RELATIVE_PATH_KEY, HOSTILE),
                        ("key\x1b[1mname", "x"), (c.ABSOLUTE_WIN32_PATH_KEY, "/nonexistent/" + HOSTILE)])
    text = run(*command, child)
    assert_no_control_characters(text)
    if command == ["info"]:
        assert "\\x1b[2J" in text  # shown, escaped, so the user sees what the file holds


@pytest.mark.parametrize("secret", ["/etc/passwd", "/etc/shadow"])
@pytest.mark.parametrize("command", [["info"], ["chain"], ["check"], ["check", "--chain"], ["hash"]])
def test_locator_pointing_at_a_system_file_never_quotes_its_bytes(child, secret, command):
    if not os.path.exists(secret):
        pytest.skip(f"{secret} is absent")
    set_locator(child, [(c.PARENT_LINKAGE_KEY, linkage(child)), (c.ABSOLUTE_WIN32_PATH_KEY, secret)])
    text = run(*command, child)
    try:
        with open(secret, "rb") as f:
            head = f.read(64)
    except PermissionError:
        head = b"root:"  # both files start with the root account's line
    for n in (5, 8):  # "root:" never appears in our own text or the paths
        assert head[:n].decode("latin-1") not in text, text
        assert repr(head[:n]) not in text, text
    assert secret in text and "not a VHDX" in text, text


def test_check_names_a_non_vhdx_parent_without_its_bytes(child, tmp_path):
    fake = tmp_path / "fake.vhdx"
    fake.write_bytes(b"SECRETXY" + bytes(2 * MiB))
    set_locator(child, [(c.PARENT_LINKAGE_KEY, linkage(child)), (c.ABSOLUTE_WIN32_PATH_KEY, str(fake))])
    report = check_image(child)
    text = " ".join(f.message for f in report.all_findings)
    assert "SECRET" not in text
    assert "not a VHDX" in text


def test_printable_escapes_controls_bidi_overrides_and_undecodable_names_only():
    from vhdx_cli.render import printable

    assert printable("C:\\VMs\\disk 1.vhdx") == "C:\\VMs\\disk 1.vhdx"  # ordinary paths are untouched
    assert printable("a\x1b[2J\r\n\x9b\u202eb") == "a\\x1b[2J\\x0d\\x0a\\x9b\\u202eb"
    assert printable("name\udcff") == "name\\udcff"  # a non-UTF-8 file name (surrogateescape)


def test_vm_names_from_configuration_files_are_escaped(tmp_path):
    # A .vmcx is a file like any other: a VM or checkpoint name with ANSI sequences must not drive the terminal.
    from dataclasses import replace

    from vhdx_fixtures.vm_folder import build_vm_folder, load_vm_spec

    spec = load_vm_spec("vm-checkpoints")
    hostile = "web\x1b[2J\x1b]0;owned\x07"
    build_vm_folder(replace(spec, vm_name=hostile), str(tmp_path / "vm"))
    for command in (["vm", "show"], ["vm", "audit"]):
        result = CliRunner().invoke(cli, [*command, str(tmp_path / "vm")])
        assert "\x1b" not in result.output and "\x07" not in result.output, command
        assert "web\\x1b[2J" in result.output
