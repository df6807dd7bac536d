import pytest

from hierdino.data import layouts
from hierdino.hierarchy import load_hierarchy
from hierdino.labels import LabelMapError, get_label_map, load_label_maps, map_labels


def test_maps_raw_labels_and_unlabeled():
    h = load_hierarchy("wbc-h1")
    assert map_labels("matek_aml_2019", ["MYB", "MYO", "NGB"], h) == ["myelocyte", "myeloblast", "neutrophil_band"]
    assert map_labels("bone_marrow_2021", ["ART", "PLM", None], h) == [None, "plasma_cell", None]
    assert map_labels("raabin_wbc", ["Neutrophil", "Lymphocyte"], h) == ["neutrophil", "lymphocyte_mature"]


def test_every_packaged_map_targets_wbc_h1_nodes_and_each_layout_has_a_map_per_tree():
    h1, h2 = load_hierarchy("wbc-h1"), load_hierarchy("wbc-h2")
    maps = load_label_maps()
    h2_only = {"pbc", "bloodmnist"}  # immature granulocytes under wbc-h2's granulocytic_normal_immature
    for name, lm in maps.items():
        if name not in h2_only:
            lm.check_hierarchy(h1)
    for name in h2_only:
        with pytest.raises(LabelMapError, match="granulocytic_normal_immature"):
            maps[name].check_hierarchy(h1)
    for layout in layouts.LAYOUTS:
        for h in (h1, h2):
            maps[layouts.source_for(layout, h.name)].check_hierarchy(h)


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
