import pytest

from hierdino.hierarchy import HierarchyError, hierarchy_from_dict, load_hierarchy, main


@pytest.mark.parametrize("name,leaves,nodes_with_root,leaf_depths", [
    ("wbc-h1", 26, 46, (2, 4)),
    ("wbc-h2", 25, 53, (2, 5)),
])
def test_packaged_tree_invariants(name, leaves, nodes_with_root, leaf_depths):
    h = load_hierarchy(name)
    assert len(h.leaves) == leaves
    assert len(h.nodes) + 1 == nodes_with_root
    assert h.nodes[: len(h.leaves)] == h.leaves
    assert len(set(h.nodes)) == len(h.nodes)
    depths = [h.depth(leaf) for leaf in h.leaves]
    assert (min(depths), max(depths)) == leaf_depths
    assert h.max_depth == leaf_depths[1]
    for n in h.nodes:
        assert h.nodes[h.index(n)] == n
        assert h.depth(n) == len(h.path(n))
        assert h.ancestors(n)[-1] == "root"
        assert h.leaves_under(n)
        assert h.distance(n, n) == 0
    # every leaf is under exactly one lineage
    lineages = [n for n in h.nodes if h.depth(n) == 1]
    assert sorted(sum((h.leaves_under(x) for x in lineages), [])) == sorted(h.leaves)


def test_wbc_h1_relations():
    h = load_hierarchy("wbc-h1")
    assert h.depth("root") == 0 and h.depth("granulopoiesis") == 1
    assert h.parent("neutrophil_band") == "neutrophil"
    assert h.parent("granulopoiesis") == "root"
    assert h.ancestors("neutrophil_band") == ["neutrophil", "granulocytic_mature", "granulopoiesis", "root"]
    assert h.leaves_under("neutrophil") == ["neutrophil_band", "neutrophil_segmented"]
    assert h.lca("neutrophil_band", "eosinophil") == "granulocytic_mature"
    assert h.distance("neutrophil_band", "neutrophil_segmented") == 2
    assert h.distance("neutrophil_band", "eosinophil") == 4
    assert h.distance("neutrophil_band", "monocyte") == 7
    assert h.distance("neutrophil", "neutrophil_band") == 1
    assert h.lca("blast", "platelet") == "root"
    assert h.is_leaf("basophil") and not h.is_leaf("neutrophil")
    with pytest.raises(KeyError, match="did you mean neutrophil"):
        h.index("neutrophill")


def test_membership_and_path_matrices():
    h = load_hierarchy("wbc-h1")
    m = h.leaf_membership()
    assert m.shape == (45, 26)
    assert m[: 26].int().sum().item() == 26 and bool(m[:26].diagonal().all())
    assert m[h.index("lymphocyte_mature")].sum().item() == 6
    p = h.path_matrix()
    assert p[h.index("neutrophil_band")].sum().item() == 4


def test_rejects_duplicates_empty_cycles_and_bad_values():
    with pytest.raises(HierarchyError, match="duplicate node name 'b'"):
        hierarchy_from_dict({"name": "x", "root": {"a": ["b"], "c": ["b"]}})
    with pytest.raises(HierarchyError, match="empty"):
        hierarchy_from_dict({"name": "x", "root": {}})
    cyclic = {"a": None}
    cyclic["a"] = cyclic
    with pytest.raises(HierarchyError, match="cycle"):
        hierarchy_from_dict({"name": "x", "root": cyclic})
    with pytest.raises(HierarchyError, match="must be a mapping"):
        hierarchy_from_dict({"name": "x", "root": {"a": 3}})
    with pytest.raises(HierarchyError, match="reserved"):
        hierarchy_from_dict({"name": "x", "root": {"root": ["a"]}})
    with pytest.raises(HierarchyError, match="unknown hierarchy 'wbc-h9'"):
        load_hierarchy("wbc-h9")


def test_yaml_alias_cycle_in_file(tmp_path):
    f = tmp_path / "cyc.yaml"
    f.write_text("name: cyc\nroot: &r\n  a:\n    b: *r\n")
    with pytest.raises(HierarchyError, match="cycle"):
        load_hierarchy(str(f))


def test_show_cli(capsys):
    main(["show", "wbc-h2"])
    out = capsys.readouterr().out
    assert out.startswith("wbc-h2: 25 leaves, 52 nodes + root, max depth 5")
    assert "blast_maturity  (depth 3, 3 leaves)" in out
