"""Biological class trees: loading, node indices, depths and tree distances.

A hierarchy file is YAML with a ``name`` and a ``root`` mapping. Each key of a mapping is a node;
its value is a mapping (children), a list of leaf names, or ``null`` (the node is a leaf)::

    name: wbc-h1
    root:
      granulopoiesis:
        granulocytic_mature:
          basophil: null
          neutrophil: [neutrophil_band, neutrophil_segmented]

Every node name must be unique, so a dataset label names exactly one node. ``Hierarchy.nodes`` is
the target index space of the losses: leaves first (in ``leaves`` order), then internal nodes.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import math
import sys
from pathlib import Path
from typing import Sequence

import yaml

from hierdino import packaged
from hierdino.errors import UserError

ROOT = "root"

HIERARCHIES = "hierdino.hierarchies"  # the package that holds the packaged trees (and label maps)


class HierarchyError(UserError, ValueError):
    """A hierarchy file that cannot be a tree (duplicate names, empty, cycles, bad values)."""

    kind = "hierarchy"


class Hierarchy:
    """A rooted tree of class names with precomputed paths.

    Args:
        name: the hierarchy's name (``wbc-h1`` ...).
        parents: child -> parent for every node except the root, in depth-first order.
    """

    def __init__(self, name: str, parents: dict[str, str], source: str = "<memory>"):
        if not parents:
            raise HierarchyError(f"hierarchy {name!r} ({source}) is empty: the root has no children")
        self.name = name
        self.source = source
        self._parent = dict(parents)
        self._children: dict[str, list[str]] = {ROOT: []}
        for child, parent in parents.items():
            self._children.setdefault(parent, []).append(child)
            self._children.setdefault(child, [])
        order = list(parents)  # depth-first, as written in the file
        self.leaves: list[str] = [n for n in order if not self._children[n]]
        internal = [n for n in order if self._children[n]]
        self.nodes: list[str] = self.leaves + internal
        self._index = {n: i for i, n in enumerate(self.nodes)}
        self._depth = {ROOT: 0}
        for n in order:  # parents precede children in depth-first order
            self._depth[n] = self._depth[self._parent[n]] + 1
        self.max_depth = max(self._depth.values())

    # -- lookups ---------------------------------------------------------------------------------
    def _check(self, name: str) -> None:
        if name != ROOT and name not in self._index:
            close = difflib.get_close_matches(str(name), self.nodes, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"{name!r} is not a node of hierarchy {self.name!r}{hint}")

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def num_leaves(self) -> int:
        return len(self.leaves)

    def index(self, name: str) -> int:
        """Position of ``name`` in ``nodes``: the target index the losses take."""
        self._check(name)
        if name == ROOT:
            raise KeyError("the root has no target index")
        return self._index[name]

    def is_leaf(self, name: str) -> bool:
        self._check(name)
        return name != ROOT and not self._children[name]

    def depth(self, name: str) -> int:
        """Edges from the root: root = 0, lineages = 1."""
        self._check(name)
        return self._depth[name]

    def parent(self, name: str) -> str | None:
        """The parent node (``"root"`` for lineages, ``None`` for the root)."""
        self._check(name)
        return self._parent.get(name)

    def children(self, name: str) -> list[str]:
        self._check(name)
        return list(self._children[name])

    def ancestors(self, name: str) -> list[str]:
        """Proper ancestors of ``name``, nearest first, ending with the root."""
        self._check(name)
        out, node = [], name
        while node != ROOT:
            node = self._parent[node]
            out.append(node)
        return out

    def path(self, name: str) -> list[str]:
        """Nodes from the lineage down to ``name`` inclusive (the root excluded)."""
        return [n for n in reversed(self.ancestors(name)) if n != ROOT] + [name]

    @functools.lru_cache(maxsize=None)
    def leaves_under(self, name: str) -> list[str]:
        """Leaves of the subtree rooted at ``name`` (``[name]`` for a leaf), in ``leaves`` order."""
        self._check(name)
        if name == ROOT:
            return list(self.leaves)
        return [leaf for leaf in self.leaves if leaf == name or name in self.ancestors(leaf)]

    def lca(self, a: str, b: str) -> str:
        """Lowest common ancestor (a node is its own ancestor here)."""
        chain_a = [a] + self.ancestors(a)
        on_b = set([b] + self.ancestors(b))
        return next(n for n in chain_a if n in on_b)

    def distance(self, a: str, b: str) -> int:
        """Number of edges on the tree path between ``a`` and ``b``."""
        c = self.lca(a, b)
        return self.depth(a) + self.depth(b) - 2 * self.depth(c)

    def at_depth(self, name: str, depth: int) -> str:
        """The ancestor-or-self of ``name`` at ``depth`` (a node shallower than ``depth`` is returned as is)."""
        chain = [ROOT] + self.path(name)
        return chain[min(depth, len(chain) - 1)]

    def leaf_membership(self):
        """Bool tensor ``[len(nodes), num_leaves]``: entry (n, l) is True when leaf l lies under node n."""
        import torch  # Ray Data ingest workers load this module and must not import torch

        m = torch.zeros(len(self.nodes), self.num_leaves, dtype=torch.bool)
        leaf_pos = {leaf: i for i, leaf in enumerate(self.leaves)}
        for n in self.nodes:
            for leaf in self.leaves_under(n):
                m[self._index[n], leaf_pos[leaf]] = True
        return m

    def path_matrix(self):
        """Bool tensor ``[len(nodes), len(nodes)]``: entry (t, n) is True when n is on t's root path (t included)."""
        import torch  # Ray Data ingest workers load this module and must not import torch

        m = torch.zeros(len(self.nodes), len(self.nodes), dtype=torch.bool)
        for t in self.nodes:
            for n in self.path(t):
                m[self._index[t], self._index[n]] = True
        return m

    def format_tree(self) -> str:
        """The tree as indented text with each node's depth and leaf count."""
        lines = [f"{self.name}: {self.num_leaves} leaves, {len(self.nodes)} nodes + root, max depth {self.max_depth}"]

        def walk(node: str, indent: int) -> None:
            for child in self._children[node]:
                kind = "leaf" if not self._children[child] else f"{len(self.leaves_under(child))} leaves"
                lines.append(f"{'  ' * indent}{child}  (depth {self._depth[child]}, {kind})")
                walk(child, indent + 1)

        walk(ROOT, 1)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The tree in the file format (``hierarchy_from_dict`` reads it back): leaves are ``None``."""
        def below(node: str) -> dict | None:
            return {c: below(c) for c in self._children[node]} or None
        return {"name": self.name, "root": below(ROOT)}

    def __repr__(self) -> str:
        return f"Hierarchy({self.name!r}, leaves={self.num_leaves}, nodes={len(self.nodes)}, max_depth={self.max_depth})"


def _walk(value, parent: str, parents: dict[str, str], stack: list[int], source: str) -> None:
    if value is None:
        return
    if id(value) in stack:
        raise HierarchyError(f"{source}: cycle in the tree below {parent!r} (a YAML alias refers to its own ancestor)")
    if isinstance(value, list):
        items = [(v, None) for v in value]
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        raise HierarchyError(
            f"{source}: children of {parent!r} must be a mapping, a list of names or null, got {value!r}"
        )
    stack.append(id(value))
    for name, sub in items:
        if not isinstance(name, str) or not name.strip():
            raise HierarchyError(f"{source}: node names must be non-empty strings, got {name!r} under {parent!r}")
        if name == ROOT:
            raise HierarchyError(f"{source}: {ROOT!r} is reserved for the root, found under {parent!r}")
        if name in parents:
            raise HierarchyError(
                f"{source}: duplicate node name {name!r} (under {parents[name]!r} and under {parent!r})"
            )
        parents[name] = parent
        _walk(sub, name, parents, stack, source)
    stack.pop()


def hierarchy_from_dict(data: dict, source: str = "<memory>") -> Hierarchy:
    """Build a hierarchy from the parsed YAML format described in the module docstring."""
    if not isinstance(data, dict) or "root" not in data:
        raise HierarchyError(f"{source}: expected a mapping with keys 'name' and 'root'")
    root = data["root"]
    if not root:
        raise HierarchyError(f"{source}: hierarchy is empty: 'root' has no children")
    parents: dict[str, str] = {}
    _walk(root, ROOT, parents, [], source)
    return Hierarchy(str(data.get("name") or Path(source).stem), parents, source)


def packaged_hierarchies() -> list[str]:
    return packaged.names(HIERARCHIES, exclude=("label_maps",))


@functools.lru_cache(maxsize=32)
def load_hierarchy(name_or_path: str) -> Hierarchy:
    """Load a packaged hierarchy by name (``wbc-h1``, ``wbc-h2``, ``synth-ood``) or a YAML file path."""
    try:
        text, path = packaged.read_text(name_or_path, HIERARCHIES)
    except FileNotFoundError:
        raise FileNotFoundError(f"hierarchy file {name_or_path} does not exist") from None
    except packaged.NotPackaged:
        raise HierarchyError(
            f"unknown hierarchy {name_or_path!r}: packaged ones are {packaged_hierarchies()}, or give a .yaml path"
        ) from None
    source = path or f"hierdino/hierarchies/{name_or_path}.yaml"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise HierarchyError(f"{source}: not valid YAML: {e}") from e
    return hierarchy_from_dict(data, source)


def level_weights_for(hierarchy: Hierarchy, alpha: float | None = None,
                      level_weights: Sequence[float] | None = None, normalize: str = "none") -> list[float]:
    """Edge weight per depth ``[w1, ..., wD]`` (an edge's depth is the depth of its child node).

    ``alpha`` gives ``w[d] = exp(-alpha * d)``; ``level_weights`` are used as given; neither means
    all ones (alpha = 0). ``normalize="tree"`` divides by the sum of the edge weights over the whole
    tree, i.e. ``sum over non-root nodes n of w[depth(n)]`` (Bertinetto et al.; the paper's setting).
    ``normalize="path"`` divides by the mean over leaves l of the average edge weight on the path
    from the root to l, ``mean_l (1/depth(l)) sum_{d=1..depth(l)} w[d]``: equal weights then become
    all 1, so HXE at alpha = 0 is exactly flat CE on leaf targets, and any alpha keeps that scale.
    """
    if alpha is not None and level_weights is not None:
        raise ValueError(f"give either alpha or level_weights, not both: alpha={alpha} and level_weights="
                         f"{list(level_weights)} are both set (set alpha=null to use level weights)")
    depth_count = hierarchy.max_depth
    if level_weights is not None:
        w = [float(x) for x in level_weights]
        if len(w) != depth_count:
            raise ValueError(
                f"level_weights has {len(w)} entries but hierarchy {hierarchy.name!r} has {depth_count} levels"
            )
        if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) == 0:
            raise ValueError(f"level_weights must be finite, >= 0 and not all 0, got {w}")
    else:
        a = 0.0 if alpha is None else float(alpha)
        if not math.isfinite(a):
            raise ValueError(f"alpha must be finite, got {alpha}")
        w = [math.exp(-a * d) for d in range(1, depth_count + 1)]
    if normalize == "tree":
        total = sum(w[hierarchy.depth(n) - 1] for n in hierarchy.nodes)
        w = [x / total for x in w]
    elif normalize == "path":
        leaf_depths = [hierarchy.depth(leaf) for leaf in hierarchy.leaves]
        mean_edge = sum(sum(w[:d]) / d for d in leaf_depths) / len(leaf_depths)
        w = [x / mean_edge for x in w]
    elif normalize != "none":
        raise ValueError(f"normalize must be 'none', 'tree' or 'path', got {normalize!r}")
    return w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hierdino.hierarchy")
    sub = parser.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print a tree with depths and leaf counts")
    show.add_argument("hierarchy", help="packaged name or YAML path")
    sub.add_parser("list", help="list packaged hierarchies")
    args = parser.parse_args(argv)
    if args.cmd == "show":
        try:
            print(load_hierarchy(args.hierarchy).format_tree())
        except (HierarchyError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        print("\n".join(packaged_hierarchies()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
