from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from vhdx.hyperv.vm_audit import audit_folder
from vhdx.hyperv.vm_picture import to_dot, tree_graph, write_png
from vhdx_cli.main import cli
from vhdx_fixtures.vm_folder import build_vm_folder, load_vm_spec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def vm_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pic") / "web01"
    build_vm_folder(load_vm_spec("vm-checkpoints"), str(out))
    return out


@pytest.fixture(scope="module")
def graph(vm_dir):
    return tree_graph(audit_folder(str(vm_dir)))


def labels(graph, kind: str) -> list[str]:
    return [n.label.split("\n")[0] for n in graph.nodes if n.kind == kind]


def test_picture_holds_each_checkpoint_now_the_orphans_and_the_missing_disk(graph):
    assert sorted(labels(graph, "checkpoint")) == ["After update", "Before update"]
    assert labels(graph, "recovery") == ["Veeam backup"]
    assert labels(graph, "now") == ["Now"]
    assert labels(graph, "orphan") == ["ORPHAN", "ORPHAN"]
    assert labels(graph, "missing") == ["SCSI 0:1"]


def test_picture_hangs_now_under_the_last_checkpoint_and_orphans_by_dashed_lines(graph):
    by_label = {n.label.split("\n")[0]: n.id for n in graph.nodes if n.kind in ("recovery", "now")}
    assert (by_label["Veeam backup"], by_label["Now"], "solid") in graph.edges
    orphan_ids = {n.id for n in graph.nodes if n.kind == "orphan"}
    assert {b for _a, b, style in graph.edges if style == "dashed"} == orphan_ids


def test_disk_boxes_give_the_file_size(graph, vm_dir):
    size = (vm_dir / "Virtual Hard Disks" / "web01.vhdx").stat().st_size
    base = next(n for n in graph.nodes if n.kind == "disk" and "web01.vhdx" in n.label)
    assert f"{size / 1048576:.1f} MiB" in base.label


def test_dot_source_names_every_edge(graph):
    dot = to_dot(graph)
    assert dot.startswith("digraph checkpoints {")
    assert dot.count(" -> ") == len(graph.edges)


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz dot not installed")
def test_png_drawn_with_dot(tmp_path, graph):
    out = tmp_path / "t.png"
    assert write_png(graph, str(out), engine="dot") == "dot"
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_png_drawn_with_matplotlib(tmp_path, graph):
    pytest.importorskip("matplotlib")
    out = tmp_path / "t.png"
    assert write_png(graph, str(out), engine="matplotlib") == "matplotlib"
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_vm_tree_refuses_to_replace_a_file_without_force(tmp_path, vm_dir):
    out = tmp_path / "keep.png"
    out.write_bytes(b"mine")
    result = CliRunner().invoke(cli, ["vm", "tree", str(vm_dir), "--png", str(out)])
    assert result.exit_code == 1 and "exists" in result.output and result.output.count("\n") == 1
    assert out.read_bytes() == b"mine"
    assert not list(tmp_path.glob(".vm-tree-*"))


def test_vm_tree_writes_the_png(tmp_path, vm_dir):
    pytest.importorskip("matplotlib") if shutil.which("dot") is None else None
    out = tmp_path / "tree.png"
    result = CliRunner().invoke(cli, ["vm", "tree", str(vm_dir), "--png", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG_SIGNATURE
