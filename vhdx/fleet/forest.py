"""Assemble chains and branching trees of disks from their probes alone (pure: no file is opened here).

A differencing disk's parent is the scanned disk whose DataWriteGuid equals its parent_linkage (or
parent_linkage2); the locator paths are hints only: they pick one of several disks with that GUID, and they
tell a broken link (the file the locator names is there, but its DataWriteGuid changed: it was written after
the child was made) from a missing parent (an orphan).

Parent status of each disk: ``none`` (a base disk), ``ok``, ``missing`` (orphan), ``mismatch`` (broken
linkage), ``ambiguous`` (several disks carry the GUID and no hint picks one), ``loop`` (the linkage leads back
into the disk's own chain), ``parent_unreadable`` (the locator names a scanned file that could not be read),
``unknown`` (the disk itself could not be read) and ``outside`` (not a problem: no scanned disk fits, but the
file the locator names exists outside the scanned roots; its linkage is not verified).

References: [MS-VHDX] §2.2.2 (DataWriteGuid), §2.6.2.6 (parent locator, linkage keys).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

from vhdx.fleet.probe import DiskProbe, JournalProbe, hinted_paths

PROBLEM_STATUSES = ("missing", "mismatch", "ambiguous", "loop", "parent_unreadable")
DEEPEST_SHOWN = 5


def _key(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


@dataclass
class DiskNode:
    """A probe and where the forest places it."""

    probe: DiskProbe
    parent_status: str = "none"
    parent: str | None = None  # the resolved parent's path (status ok), or the file the locator names
    candidates: tuple[str, ...] = ()  # disks carrying the linkage GUID (status ambiguous)
    children: list[str] = field(default_factory=list)
    depth: int = 0  # layers from the tree's root down to this disk (the root is 1); 0 when unreadable
    tree: str | None = None  # path of the tree's root
    merge_interrupted: str | None = None  # step of a pending merge journal naming this disk


@dataclass(frozen=True)
class Tree:
    """One tree of disks: a base (or a disk whose parent is a problem) and every disk that descends from it."""

    root: str
    root_status: str  # the root's parent status: "none" for a healthy base disk
    disks: int
    depth: int
    total_size: int  # bytes of the files
    leaves: int
    branches: int  # disks with more than one child


@dataclass
class Forest:
    nodes: dict[str, DiskNode]  # by path, in path order
    trees: list[Tree]
    journals: list[JournalProbe]

    def with_status(self, *statuses: str) -> list[DiskNode]:
        return [n for n in self.nodes.values() if n.parent_status in statuses]

    @property
    def dirty(self) -> list[DiskNode]:
        return [n for n in self.nodes.values() if n.probe.dirty_log]

    @property
    def unreadable(self) -> list[DiskNode]:
        return [n for n in self.nodes.values() if not n.probe.ok]

    @property
    def interrupted(self) -> list[DiskNode]:
        return [n for n in self.nodes.values() if n.merge_interrupted]

    @property
    def check_failed(self) -> list[DiskNode]:
        return [n for n in self.nodes.values() if n.probe.check is not None and n.probe.check.exit_code not in (0, 3)]

    def descendants(self, path: str) -> list[DiskNode]:
        out, stack = [], [path]
        while stack:
            node = self.nodes[stack.pop()]
            out.append(node)
            stack.extend(node.children)
        return out

    def space_under(self, nodes: list[DiskNode]) -> int:
        """Bytes of these disks' files and of every disk that descends from them."""
        return sum(d.probe.file_size for n in nodes for d in self.descendants(n.probe.path))

    def deepest(self, count: int = DEEPEST_SHOWN) -> list[DiskNode]:
        leaves = [n for n in self.nodes.values() if n.probe.ok and not n.children]
        return sorted(leaves, key=lambda n: (-n.depth, n.probe.path))[:count]


def _resolve(node: DiskNode, by_guid: dict[str, list[DiskNode]], by_key: dict[str, DiskNode]) -> None:
    probe = node.probe
    me = _key(probe.path)
    hinted = [h for h in hinted_paths(probe.path, probe.parent_hints) if h != me]
    found: dict[str, DiskNode] = {}
    for guid in probe.parent_linkages:
        for cand in by_guid.get(guid, ()):
            if _key(cand.probe.path) != me:
                found.setdefault(_key(cand.probe.path), cand)
    if len(found) == 1:
        node.parent_status, node.parent = "ok", next(iter(found.values())).probe.path
        return
    if found:
        picked = [found[h] for h in dict.fromkeys(hinted) if h in found]
        if picked:
            node.parent_status, node.parent = "ok", picked[0].probe.path
        else:
            node.parent_status = "ambiguous"
            node.candidates = tuple(sorted(n.probe.path for n in found.values()))
        return
    # A file that vanished during the scan is not there to be the parent: its children are orphans.
    named = next((by_key[h] for h in hinted if h in by_key and not by_key[h].probe.vanished), None)
    present = [p for p in probe.hints_present if _key(p) != me and _key(p) not in by_key]
    if named is None and present:
        node.parent_status, node.parent = "outside", present[0]  # there, but not scanned: not an orphan
    elif named is None:
        node.parent_status = "missing"
        node.parent = probe.parent_hints[0][1] if probe.parent_hints else None
    else:
        node.parent_status = "mismatch" if named.probe.ok else "parent_unreadable"
        node.parent = named.probe.path


def _break_loops(nodes: dict[str, DiskNode]) -> None:
    """Mark disks whose parent links form a cycle as ``loop`` and cut those links (hostile or swapped files)."""
    state: dict[str, int] = {}  # 1 = on the current walk, 2 = done
    for start in nodes:
        walk, path = [], start
        while path is not None and state.get(path) is None:
            state[path] = 1
            walk.append(path)
            node = nodes[path]
            path = node.parent if node.parent_status == "ok" else None
        if path is not None and state.get(path) == 1:
            for member in walk[walk.index(path):]:
                nodes[member].parent_status = "loop"
        for member in walk:
            state[member] = 2


def assemble(disks: list[DiskProbe], journals: list[JournalProbe] = ()) -> Forest:
    """The forest of ``disks`` (records in path order), with pending merges attached to the disks they name."""
    nodes = {p.path: DiskNode(p) for p in sorted(disks, key=lambda p: p.path)}
    by_key = {_key(path): node for path, node in nodes.items()}
    by_guid: dict[str, list[DiskNode]] = defaultdict(list)
    for node in nodes.values():
        if node.probe.ok:
            by_guid[node.probe.data_write_guid].append(node)
    for node in nodes.values():
        if not node.probe.ok:
            node.parent_status = "unknown"
        elif node.probe.has_parent:
            _resolve(node, by_guid, by_key)
    _break_loops(nodes)
    for path, node in nodes.items():
        if node.parent_status == "ok":
            nodes[node.parent].children.append(path)
    trees = []
    for path, node in nodes.items():
        if node.probe.ok and node.parent_status != "ok":
            trees.append(_grow(nodes, path))
    journals = sorted(journals, key=lambda j: j.path)
    for journal in journals:
        for named in (journal.destination, journal.child):
            node = by_key.get(_key(named)) if named else None
            if node is not None:
                node.merge_interrupted = journal.state
    return Forest(nodes, trees, list(journals))


def _grow(nodes: dict[str, DiskNode], root: str) -> Tree:
    """Set depth and tree of every disk under ``root`` (iteratively: chains may be hundreds deep)."""
    stack = [(root, 1)]
    count = size = leaves = branches = depth = 0
    while stack:
        path, level = stack.pop()
        node = nodes[path]
        node.depth, node.tree = level, root
        count += 1
        size += node.probe.file_size
        depth = max(depth, level)
        leaves += not node.children
        branches += len(node.children) > 1
        stack.extend((child, level + 1) for child in node.children)
    return Tree(root, nodes[root].parent_status, count, depth, size, leaves, branches)
