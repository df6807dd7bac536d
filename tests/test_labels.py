import pytest

from hierdino.data import layouts
from hierdino.hierarchy import load_hierarchy
from hierdino.labels import LabelMapError, get_label_map, load_label_maps, map_labels


def test_maps_raw_labels_and_unlabeled():
    h = load_hierarchy("wbc-h1")
    assert map_labels("matek_aml_2019", ["MYB", "MYO", "NGB"], h) == ["myelocyte", "myeloblast", "neutrophil_band"]
    assert map_labels("bone_marrow_2021", ["ART", "PLM", None], h) == [None, "plasma_cell", None]
    assert map_labels("raabin_wbc", ["Neutrophil", "Lymphocyte"], h) == ["neutrophil", "lymphocyte_mature"]


# Every packaged source and its number of raw labels (mapped + unlabeled), counted from the datasets'
# published class lists (and label_maps.yaml's comments): a map lost or truncated on packaging shows here.
KNOWN_SOURCES = {"matek_aml_2019": 15, "bone_marrow_2021": 21, "raabin_wbc": 5, "mll_german_codes": 17,
                 "pbc": 13, "pbc_h1": 13, "bloodmnist": 8, "bloodmnist_h1": 8, "kaggle_blood_cells": 4, "lisc": 6}
KNOWN_LAYOUTS = {"pbc": ("pbc_h1", "pbc"), "kaggle-blood-cells": ("kaggle_blood_cells",) * 2,
                 "raabin": ("raabin_wbc",) * 2, "lisc": ("lisc",) * 2, "bloodmnist": ("bloodmnist_h1", "bloodmnist"),
                 "matek": ("matek_aml_2019",) * 2}  # layout -> (its map on wbc-h1, on wbc-h2)


def test_every_packaged_map_targets_wbc_h1_nodes_and_each_layout_has_a_map_per_tree():
    h1, h2 = load_hierarchy("wbc-h1"), load_hierarchy("wbc-h2")
    maps = load_label_maps()
    assert {name: len(lm.mapping) + len(lm.unlabeled) for name, lm in maps.items()} == KNOWN_SOURCES
    assert (len(maps["bone_marrow_2021"].unlabeled), len(maps["lisc"].unlabeled)) == (3, 1)
    h2_only = {"pbc", "bloodmnist"}  # immature granulocytes under wbc-h2's granulocytic_normal_immature
    checked = []
    for name, lm in maps.items():
        if name not in h2_only:
            lm.check_hierarchy(h1)
            checked.append(name)
    assert sorted(checked) == sorted(set(KNOWN_SOURCES) - h2_only)
    for name in h2_only:
        with pytest.raises(LabelMapError, match="granulocytic_normal_immature"):
            maps[name].check_hierarchy(h1)
        # the wbc-h1 twin reads the same raw labels
        assert set(maps[f"{name}_h1"].mapping) == set(maps[name].mapping)
    assert {layout: tuple(layouts.source_for(layout, t) for t in ("wbc-h1", "wbc-h2"))
            for layout in layouts.LAYOUTS} == KNOWN_LAYOUTS
    for layout in layouts.LAYOUTS:
        for h in (h1, h2):
            lm = maps[layouts.source_for(layout, h.name)]
            lm.check_hierarchy(h)
            # every raw label lands on a node of the tree (or is explicitly unlabeled)
            assert all(h.index(node) >= 0 for node in lm.map(sorted(lm.mapping)))


def test_unknown_labels_all_named_with_counts():
    with pytest.raises(LabelMapError) as e:
        map_labels("matek_aml_2019", ["BAS", "XXX", "XXX", "YYY", "EOS", "XXX"])
    msg = str(e.value)
    assert "'XXX' (3)" in msg and "'YYY' (1)" in msg
    assert "matek_aml_2019" in msg and "label_maps.yaml" in msg
    assert "4 image(s)" in msg


def test_unknown_source_and_targets_outside_hierarchy(tmp_path):
    with pytest.raises(LabelMapError, match="no label map for source 'nope'"):
        get_label_map("nope")
    f = tmp_path / "m.yaml"
    f.write_text("mine:\n  A: neutrophil\n  B: not_a_node\n  C: also_missing\n")
    with pytest.raises(LabelMapError, match="also_missing, not_a_node"):
        get_label_map("mine", load_hierarchy("wbc-h1"), f)
    assert get_label_map("raabin_wbc", load_hierarchy("wbc-h2")).map(["Eosinophil"]) == ["eosinophil"]
