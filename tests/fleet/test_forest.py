from __future__ import annotations

from vhdx.fleet.forest import assemble
from vhdx.fleet.probe import DiskProbe, JournalProbe

G = [f"00000000-0000-0000-0000-{i:012d}" for i in range(20)]


def base(path, guid, size=100):
    return DiskProbe(path, file_size=size, disk_type="dynamic", data_write_guid=guid)


def child(path, guid, linkage, hint=None, size=10):
    hints = (("relative_path", hint),) if hint else ()
    return DiskProbe(path, file_size=size, disk_type="differencing", data_write_guid=guid,
                     parent_linkages=(linkage,), parent_hints=hints)


def test_chain_links_each_child_to_the_disk_with_its_linkage_guid():
    forest = assemble([base("/d/a.vhdx", G[1]), child("/d/b.avhdx", G[2], G[1]), child("/d/c.avhdx", G[3], G[2])])
    assert [forest.nodes[p].parent for p in ("/d/b.avhdx", "/d/c.avhdx")] == ["/d/a.vhdx", "/d/b.avhdx"]
    assert [n.parent_status for n in forest.nodes.values()] == ["none", "ok", "ok"]
    assert forest.nodes["/d/c.avhdx"].depth == 3
    assert len(forest.trees) == 1 and forest.trees[0].depth == 3 and forest.trees[0].total_size == 120


def test_linkage_wins_over_a_locator_path_that_names_another_file():
    forest = assemble([base("/d/a.vhdx", G[1]), base("/d/x.vhdx", G[9]), child("/d/b.avhdx", G[2], G[1], "x.vhdx")])
    assert forest.nodes["/d/b.avhdx"].parent == "/d/a.vhdx"


def test_child_without_a_disk_of_its_linkage_is_an_orphan():
    forest = assemble([child("/d/b.avhdx", G[2], G[1], ".\\a.vhdx")])
    node = forest.nodes["/d/b.avhdx"]
    assert node.parent_status == "missing" and node.parent == ".\\a.vhdx"


def test_locator_naming_a_disk_with_another_guid_is_a_broken_link():
    forest = assemble([base("/d/a.vhdx", G[7]), child("/d/b.avhdx", G[2], G[1], ".\\a.vhdx")])
    node = forest.nodes["/d/b.avhdx"]
    assert node.parent_status == "mismatch" and node.parent == "/d/a.vhdx"


def test_file_name_next_to_the_child_counts_as_a_hint():
    forest = assemble([base("/d/a.vhdx", G[7]), child("/d/b.avhdx", G[2], G[1], "C:\\VMs\\a.vhdx")])
    assert forest.nodes["/d/b.avhdx"].parent_status == "mismatch"


def test_two_disks_with_the_linkage_guid_are_told_apart_by_the_locator():
    disks = [base("/d/a.vhdx", G[1]), base("/copy/a.vhdx", G[1]), child("/d/b.avhdx", G[2], G[1], ".\\a.vhdx")]
    assert assemble(disks).nodes["/d/b.avhdx"].parent == "/d/a.vhdx"


def test_two_disks_with_the_linkage_guid_and_no_hint_are_ambiguous():
    disks = [base("/e/a.vhdx", G[1]), base("/f/a.vhdx", G[1]), child("/d/b.avhdx", G[2], G[1], ".\\z.vhdx")]
    node = assemble(disks).nodes["/d/b.avhdx"]
    assert node.parent_status == "ambiguous" and node.candidates == ("/e/a.vhdx", "/f/a.vhdx")


def test_linkage_cycle_is_a_loop_and_ends():
    forest = assemble([child("/d/a.avhdx", G[1], G[2]), child("/d/b.avhdx", G[2], G[1])])
    assert {n.parent_status for n in forest.nodes.values()} == {"loop"}
    assert len(forest.trees) == 2


def test_locator_naming_an_unreadable_file_says_so():
    forest = assemble([DiskProbe("/d/a.vhdx", error="bad"), child("/d/b.avhdx", G[2], G[1], ".\\a.vhdx")])
    assert forest.nodes["/d/b.avhdx"].parent_status == "parent_unreadable"
    assert forest.nodes["/d/a.vhdx"].parent_status == "unknown" and forest.unreadable[0].probe.path == "/d/a.vhdx"


def test_orphan_space_counts_the_orphan_and_its_descendants():
    forest = assemble([child("/d/b.avhdx", G[2], G[1], size=10), child("/d/c.avhdx", G[3], G[2], size=5)])
    assert forest.space_under(forest.with_status("missing")) == 15


def test_branches_share_a_tree_and_deepest_lists_the_longest_first():
    forest = assemble([base("/d/a.vhdx", G[1]), child("/d/b.avhdx", G[2], G[1]), child("/d/c.avhdx", G[3], G[2]),
                       child("/d/d.avhdx", G[4], G[1])])
    tree = forest.trees[0]
    assert (tree.disks, tree.leaves, tree.branches, tree.depth) == (4, 2, 1, 3)
    assert [n.probe.path for n in forest.deepest()] == ["/d/c.avhdx", "/d/d.avhdx"]


def test_pending_journal_marks_its_child_and_destination():
    journal = JournalProbe("/d/a.vhdx.merge-journal", child="/d/b.avhdx", destination="/d/a.vhdx", state="data_done")
    forest = assemble([base("/d/a.vhdx", G[1]), child("/d/b.avhdx", G[2], G[1])], [journal])
    assert [n.merge_interrupted for n in forest.nodes.values()] == ["data_done", "data_done"]


def test_deep_chain_assembles_without_recursion():
    disks = [base("/d/0.vhdx", "g0")] + [child(f"/d/{i}.avhdx", f"g{i}", f"g{i - 1}") for i in range(1, 3000)]
    assert assemble(disks).trees[0].depth == 3000


def test_locator_naming_a_file_that_vanished_makes_an_orphan():
    gone = DiskProbe("/d/a.vhdx", error="vanished during the scan", vanished=True)
    forest = assemble([gone, child("/d/b.avhdx", G[2], G[1], ".\\a.vhdx")])
    assert forest.nodes["/d/b.avhdx"].parent_status == "missing"


def test_parent_that_exists_outside_the_scan_is_not_an_orphan():
    probe = DiskProbe("/d/b.avhdx", disk_type="differencing", data_write_guid=G[2], parent_linkages=(G[1],),
                      parent_hints=(("relative_path", "..\\t\\a.vhdx"),), hints_present=("/t/a.vhdx",))
    node = assemble([probe]).nodes["/d/b.avhdx"]
    assert node.parent_status == "outside" and node.parent == "/t/a.vhdx"
