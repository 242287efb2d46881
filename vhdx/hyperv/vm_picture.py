"""The checkpoint tree of an audited VM folder as a picture: checkpoints, their disks with sizes, orphans.

``tree_graph`` builds a plain graph (pure); ``to_dot`` writes it in Graphviz's language; ``write_png`` draws it
with Graphviz's ``dot`` when it is installed, else with matplotlib (the ``picture`` extra).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

from vhdx.errors import InvalidRequestError, UnsupportedError

COLOURS = {"vm": "#d9e8fb", "checkpoint": "#e8f4d9", "recovery": "#fde2c8", "disk": "#f2f2f2",
           "orphan": "#f8c9c9", "now": "#fff2b3", "missing": "#f8c9c9"}


@dataclass(frozen=True)
class Node:
    id: str
    label: str
    kind: str  # vm | checkpoint | recovery | now | disk | orphan | missing


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # (from, to, style: solid | dashed)

    def children(self, node_id: str) -> list[str]:
        return [b for a, b, _ in self.edges if a == node_id]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _wrap(name: str) -> str:
    """Hyper-V names checkpoint disks <disk>_<GUID>.avhdx: keep the disk name and the GUID's first group."""
    m = re.fullmatch(r"(.*_)([0-9A-Fa-f]{8})-[0-9A-Fa-f-]{27}(\.a?vhdx)", name)
    return f"{m.group(1)}\n{m.group(2)}...{m.group(3)}" if m else name


def tree_graph(audit) -> Graph:
    """The graph of a ``FolderAudit``: VM -> checkpoints (derived tree) -> Now; each with its disks."""
    g = Graph()
    sizes = {x["path"]: x["file_size"] for c in audit.folder.chains.values() for x in c.layers}
    disk_node: dict[str, str] = {}

    def disk(owner: str, drive) -> None:
        if not drive.is_disk:
            return
        if drive.local is None:
            nid = f"missing:{owner}:{drive.slot}"
            g.nodes.append(Node(nid, f"{drive.slot}\nMISSING\n{os.path.basename(drive.path.replace(chr(92), '/'))}",
                                "missing"))
        else:
            path = os.path.abspath(drive.local)
            nid = disk_node.setdefault(path, f"disk:{path}")
            if not any(n.id == nid for n in g.nodes):
                label = f"{drive.slot}\n{_wrap(os.path.basename(path))}\n{_size(sizes.get(path, 0))}"
                g.nodes.append(Node(nid, label, "disk"))
        g.edges.append((owner, nid, "solid"))

    for vm in audit.folder.vms:
        root = f"vm:{vm.id}"
        g.nodes.append(Node(root, f"VM {vm.name}\ngeneration {vm.generation or '?'}", "vm"))
        for c in vm.checkpoints:
            kind = "recovery" if c.kind in ("recovery", "planned", "replica") else "checkpoint"
            when = c.created.strftime("%Y-%m-%d %H:%M") if c.created else "?"
            g.nodes.append(Node(f"cp:{c.id}", f"{c.name}\n[{c.kind}] {when}", kind))
        for c in vm.checkpoints:
            g.edges.append((f"cp:{c.parent_id}" if c.parent_id else root, f"cp:{c.id}", "solid"))
            for d in c.drives:
                disk(f"cp:{c.id}", d)
        now = f"now:{vm.id}"
        g.nodes.append(Node(now, "Now\n(running state)", "now"))
        g.edges.append((f"cp:{vm.now_parent_id}" if vm.now_parent_id else root, now, "solid"))
        for d in vm.drives:
            disk(now, d)
    for o in audit.orphans:
        nid = f"orphan:{o['path']}"
        g.nodes.append(Node(nid, f"ORPHAN\n{_wrap(os.path.basename(o['path']))}\n{_size(o['bytes'])}", "orphan"))
        # In the running chain: under Now; else under the disk it was made from, when that is known.
        parent_name = os.path.basename(str(o.get("parent") or "").replace("\\", "/")).casefold()
        anchor = next((n for p, n in disk_node.items() if os.path.basename(p).casefold() == parent_name), None)
        if o.get("on_chain") and audit.folder.vms:
            anchor = f"now:{audit.folder.vms[0].id}"
        anchor = anchor or (f"vm:{audit.folder.vms[0].id}" if audit.folder.vms else None)
        if anchor:
            g.edges.append((anchor, nid, "dashed"))
    return g


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(g: Graph) -> str:
    lines = ["digraph checkpoints {", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    for n in g.nodes:
        lines.append(f"  {_quote(n.id)} [label={_quote(n.label)}, fillcolor={_quote(COLOURS[n.kind])}];")
    for a, b, style in g.edges:
        lines.append(f"  {_quote(a)} -> {_quote(b)} [style={style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _layout(g: Graph) -> dict[str, tuple[float, float]]:
    """Tidy-enough tree layout: leaves left to right, parents centred above their children."""
    has_parent = {b for _, b, _ in g.edges}
    roots = [n.id for n in g.nodes if n.id not in has_parent]
    pos: dict[str, tuple[float, float]] = {}
    next_x = [0.0]

    def place(nid: str, depth: int) -> float:
        if nid in pos:
            return pos[nid][0]
        kids = [k for k in g.children(nid) if k not in pos]
        pos[nid] = (0.0, -depth)  # reserve (also breaks cycles)
        xs = [place(k, depth + 1) for k in kids]
        x = sum(xs) / len(xs) if xs else next_x[0]
        if not xs:
            next_x[0] += 1.0
        pos[nid] = (x, -depth)
        return x

    for r in roots:
        place(r, 0)
    return pos


def _draw_matplotlib(g: Graph, out: str) -> None:
    try:
        import matplotlib  # noqa: PLC0415 - optional dependency (the picture extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 - after matplotlib.use("Agg")
    except ImportError:
        raise UnsupportedError("drawing needs Graphviz `dot` or matplotlib (pip install 'vhdx-chain[picture]')") \
            from None
    pos = _layout(g)
    width = max(x for x, _ in pos.values()) + 1 if pos else 1
    depth = -min(y for _, y in pos.values()) + 1 if pos else 1
    fig, ax = plt.subplots(figsize=(max(4.0, 2.6 * width), max(3.0, 1.3 * depth)), dpi=80)
    ax.set_axis_off()
    for a, b, style in g.edges:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        ax.plot([x1, x2], [y1, y2], color="#666666", linestyle="--" if style == "dashed" else "-", zorder=1)
    for n in g.nodes:
        x, y = pos[n.id]
        ax.text(x, y, n.label, ha="center", va="center", fontsize=7, zorder=2,
                bbox={"boxstyle": "round,pad=0.3", "facecolor": COLOURS[n.kind], "edgecolor": "#444444"})
    ax.set_xlim(-0.7, width - 0.3)
    ax.set_ylim(-depth + 0.4, 0.6)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def write_png(g: Graph, path: str, *, overwrite: bool = False, engine: str | None = None) -> str:
    """Draw ``g`` into the PNG ``path`` (written to a temporary name, then renamed); return the engine used."""
    if os.path.lexists(path) and not overwrite:
        raise InvalidRequestError("exists", path=path, hint="overwrite")
    engine = engine or ("dot" if shutil.which("dot") else "matplotlib")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".vm-tree-", suffix=".png", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        if engine == "dot":
            subprocess.run(["dot", "-Tpng", "-o", tmp], input=to_dot(g).encode(), check=True, timeout=60,
                           capture_output=True)
        else:
            _draw_matplotlib(g, tmp)
        os.replace(tmp, path)
    except subprocess.SubprocessError as exc:
        raise UnsupportedError(f"dot failed: {exc}", path=path) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return engine
