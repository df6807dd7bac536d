"""Public dataset layouts (``data/layouts.py``) and hash splits (``shards.SplitSpec``), on tiny
samples written here in each published layout (generated images, never real data)."""

import collections
import io

import numpy as np
import pytest
from PIL import Image

from hierdino.cli.make_shards import main as make_shards
from hierdino.data import layouts, shards
from hierdino.data.shards import Item, ShardError, SplitSpec
from hierdino.hierarchy import load_hierarchy
from hierdino.labels import get_label_map


def _image(path, value=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path, format=fmt)


def _tree(root, files):
    """Write each relative path of ``files`` as a small image (the suffix picks the format)."""
    for i, rel in enumerate(files):
        fmt = {".jpeg": "JPEG", ".jpg": "JPEG", ".bmp": "BMP", ".tiff": "TIFF"}.get((root / rel).suffix, "PNG")
        _image(root / rel, i % 250, fmt)


def _lm(layout):
    return get_label_map(layouts.source_for(layout, layouts.LAYOUTS[layout].hierarchy))


def _labels(items):
    return sorted((it.image_id, it.raw_label, it.label, it.split) for it in items)


def _ids(n, prefix="cell"):
    return [Item(None, "x", "neutrophil", None, f"{prefix}/{i:05d}.png") for i in range(n)]


# -- layouts -----------------------------------------------------------------------------------

def test_pbc_prefix_gives_the_deepest_label_and_hidden_files_are_skipped(tmp_path, said):
    root = tmp_path / "PBC_dataset_normal_DIB"
    _tree(root, ["neutrophil/BNE_11.jpg", "neutrophil/SNE_12.jpg", "neutrophil/NEUTROPHIL_13.jpg",
                 "ig/IG_14.jpg", "ig/MY_15.jpg", "lymphocyte/LY_16.jpg", "platelet/PLATELET_17.jpg"])
    (root / "neutrophil" / ".DS_169665.jpg").write_bytes(b"\0\0\0\x01Bud1")  # the archive's renamed .DS_Store
    (root / "ig" / "notes.txt").write_text("x")
    items = shards.finish_splits(layouts.pbc_items(root, _lm("pbc")), "pbc")
    assert _labels(items) == [
        ("ig/IG_14.jpg", "ig/IG", "granulocytic_normal_immature", "train"),
        ("ig/MY_15.jpg", "ig/MY", "myelocyte", "train"),
        ("lymphocyte/LY_16.jpg", "lymphocyte/LY", "lymphocyte_typical", "train"),
        ("neutrophil/BNE_11.jpg", "neutrophil/BNE", "neutrophil_band", "train"),
        ("neutrophil/NEUTROPHIL_13.jpg", "neutrophil/NEUTROPHIL", "neutrophil", "train"),
        ("neutrophil/SNE_12.jpg", "neutrophil/SNE", "neutrophil_segmented", "train"),
        ("platelet/PLATELET_17.jpg", "platelet/PLATELET", "platelet", "train"),
    ]
    assert "1 .txt files, 1 hidden" in "\n".join(said)
    h1 = layouts.source_for("pbc", "wbc-h1")
    assert get_label_map(h1, load_hierarchy("wbc-h1")).map(["ig/IG"]) == ["granulocytic_immature"]


def test_pbc_prefix_in_the_wrong_folder_is_named(tmp_path):
    root = tmp_path / "PBC_dataset_normal_DIB"
    _tree(root, ["ig/MY_1.jpg", "neutrophil/MY_2.jpg"])
    with pytest.raises(ShardError, match=r"neutrophil/MY_2\.jpg: prefix MY belongs in folder ig/, not neutrophil/"):
        layouts.pbc_items(root, _lm("pbc"))
    _tree(root / "x", ["basophil/nounderscore.jpg"])
    with pytest.raises(ShardError, match=r"nounderscore\.jpg: not a PBC file name"):
        layouts.pbc_items(root / "x", _lm("pbc"))


def test_kaggle_blood_cells_train_and_test_kept_test_simple_skipped(tmp_path, said):
    root = tmp_path / "dataset2-master" / "images"
    _tree(root, ["TRAIN/EOSINOPHIL/_0_1169.jpeg", "TRAIN/NEUTROPHIL/_1_204.jpeg", "TEST/MONOCYTE/_2_35.jpeg",
                 "TEST/LYMPHOCYTE/_0_331.jpeg", "TEST_SIMPLE/MONOCYTE/_2_35.jpeg"])
    items = layouts.kaggle_items(root, _lm("kaggle-blood-cells"))
    assert _labels(items) == [
        ("TEST/LYMPHOCYTE/_0_331.jpeg", "LYMPHOCYTE", "lymphocyte_mature", "test"),
        ("TEST/MONOCYTE/_2_35.jpeg", "MONOCYTE", "monocyte", "test"),
        ("TRAIN/EOSINOPHIL/_0_1169.jpeg", "EOSINOPHIL", "eosinophil", "train"),
        ("TRAIN/NEUTROPHIL/_1_204.jpeg", "NEUTROPHIL", "neutrophil", "train"),
    ]
    assert "skipped folder(s) TEST_SIMPLE" in "\n".join(said)
    with pytest.raises(ShardError, match=r"expected the folders TRAIN, TEST, TEST_SIMPLE .*found images"):
        layouts.kaggle_items(tmp_path / "dataset2-master", _lm("kaggle-blood-cells"))


def test_raabin_train_and_testa_any_case_testb_skipped(tmp_path, said):
    _tree(tmp_path / "a", ["Train/Basophil/a.jpg", "Train/Lymphocyte/b.jpg", "TestA/Neutrophil/c.jpg",
                           "TestB/Eosinophil/e.jpg"])
    expected = [("TestA/Neutrophil/c.jpg", "Neutrophil", "neutrophil", "test"),
                ("Train/Basophil/a.jpg", "Basophil", "basophil", "train"),
                ("Train/Lymphocyte/b.jpg", "Lymphocyte", "lymphocyte_mature", "train")]
    assert _labels(layouts.raabin_items(tmp_path / "a", _lm("raabin"))) == expected
    assert "skipped folder(s) TestB" in "\n".join(said)
    _tree(tmp_path / "b", ["train/basophil/a.jpg", "train/LYMPHOCYTE/b.jpg", "testa/neutrophil/c.jpg"])
    lower = sorted((i.lower(), r.lower(), node, s) for i, r, node, s in expected)
    got = layouts.raabin_items(tmp_path / "b", _lm("raabin"))
    assert sorted((i.lower(), r.lower(), node, s) for i, r, node, s in _labels(got)) == lower


def test_lisc_main_dataset_read_masks_and_mixed_cells_not_labelled(tmp_path):
    root = tmp_path / "LISC Database"
    _tree(root, ["Main Dataset/Baso/1.bmp", "Main Dataset/eosi/1.bmp", "Main Dataset/lymp/2.bmp",
                 "Main Dataset/mixt/3.bmp", "Main Dataset/NEUT/4.bmp",
                 "Ground Truth Segmentation/Baso/areaforexpert1/1_expert.bmp"])
    items = layouts.lisc_items(root, _lm("lisc"))
    assert _labels(items) == [
        ("Baso/1.bmp", "Baso", "basophil", None), ("NEUT/4.bmp", "NEUT", "neutrophil", None),
        ("eosi/1.bmp", "eosi", "eosinophil", None), ("lymp/2.bmp", "lymp", "lymphocyte_mature", None),
        ("mixt/3.bmp", "mixt", None, None),
    ]
    assert _labels(layouts.lisc_items(root / "Main Dataset", _lm("lisc"))) == _labels(items)  # same ids
    m = shards.write_items(shards.finish_splits(items, "lisc"), str(tmp_path / "out"), "lisc", _lm("lisc"))
    assert m.counts == {"train": {"<unlabeled>": 1, "basophil": 1, "eosinophil": 1, "lymphocyte_mature": 1,
                                  "neutrophil": 1}}


def _npz(path, n=(3, 2, 2)):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (k, 4, 4, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.arange(k, dtype=np.uint8).reshape(k, 1) * 3 % 8
    np.savez_compressed(path, **arrays)
    return arrays


def test_bloodmnist_npz_keeps_its_splits_and_label_order(tmp_path):
    arrays = _npz(tmp_path / "bloodmnist.npz")
    items = layouts.npz_items(tmp_path / "bloodmnist.npz", _lm("bloodmnist"))
    # labels 0, 3, 6 / 0, 3 / 0, 3: basophil, ig, neutrophil in BloodMNIST's order
    got = [(it.image_id, it.raw_label, it.label, it.split) for it in items]
    assert got == [("train_images/0", "basophil", "basophil", "train"),
                   ("train_images/1", "ig", "granulocytic_normal_immature", "train"),
                   ("train_images/2", "neutrophil", "neutrophil", "train"),
                   ("val_images/0", "basophil", "basophil", "val"), ("val_images/1", "ig", "granulocytic_normal_immature", "val"),
                   ("test_images/0", "basophil", "basophil", "test"), ("test_images/1", "ig", "granulocytic_normal_immature", "test")]
    m = shards.write_items(items, str(tmp_path / "out"), "b", _lm("bloodmnist"))
    table = shards.read_table(str(tmp_path / "out"))
    second = Image.open(io.BytesIO(table["image"].to_pylist()[1]))
    assert second.format == "PNG" and np.array_equal(np.asarray(second), arrays["train_images"][1])
    assert m.counts["val"] == {"basophil": 1, "granulocytic_normal_immature": 1}
    with pytest.raises(ShardError, match="has splits of its own \\(train, val, test\\).*drop --split-fractions"):
        shards.finish_splits(items, "bloodmnist", spec=SplitSpec((0.5, 0.5, 0.0)))
    np.savez(tmp_path / "bad.npz", **{**arrays, "val_labels": np.array([[0], [8]])})
    with pytest.raises(ShardError, match=r"bad.npz: val_labels holds 1 value\(s\) outside 0..7, e.g. 8"):
        layouts.npz_items(tmp_path / "bad.npz", _lm("bloodmnist"))


def test_matek_published_layout_reads_as_a_folder(tmp_path):
    root = tmp_path / "AML-Cytomorphology_LMU"
    _tree(root, ["BAS/BAS_0001.tiff", "NGS/NGS_0001.tiff", "NGS/NGS_0002.tiff", "MYO/MYO_0001.tiff"])
    (root / "annotations.dat").write_text("x")
    items = layouts.READERS["matek"](root, _lm("matek"))
    assert _labels(items) == [("BAS/BAS_0001.tiff", "BAS", "basophil", None),
                              ("MYO/MYO_0001.tiff", "MYO", "myeloblast", None),
                              ("NGS/NGS_0001.tiff", "NGS", "neutrophil_segmented", None),
                              ("NGS/NGS_0002.tiff", "NGS", "neutrophil_segmented", None)]


# -- hash splits ---------------------------------------------------------------------------------

def test_adding_ten_percent_more_images_moves_none(tmp_path):
    spec = SplitSpec((0.6, 0.2, 0.2), seed=3)
    before = {it.image_id: it.split for it in shards.assign_splits(_ids(2000), spec)}
    more = _ids(2000) + _ids(200, "new")
    after = {it.image_id: it.split for it in shards.assign_splits(list(reversed(more)), spec)}
    assert all(after[i] == s for i, s in before.items())
    other = {it.image_id: it.split for it in shards.assign_splits(_ids(2000), SplitSpec((0.6, 0.2, 0.2), seed=4))}
    assert sum(other[i] != s for i, s in before.items()) > 500  # the seed matters


def test_split_of_an_id_never_changes_across_versions():
    # pinned when hash splits were introduced: a change here re-splits every dataset written since
    got = [shards.split_at(shards.split_point(f"NGS/{i}.png", 0), (0.6, 0.2, 0.2)) for i in range(12)]
    assert got == ["test", "train", "train", "test", "train", "test", "test", "train", "val", "val", "train", "train"]


def test_fractions_honoured_per_class_and_a_zero_fraction_is_empty():
    items = [Item(None, c, c, None, f"{c}/{i}.jpg") for c in ("a", "b", "c") for i in range(3000)]
    for fractions in ((0.6, 0.2, 0.2), (0.7, 0.0, 0.3), (0.0, 0.0, 1.0)):
        counts = collections.Counter((it.label, it.split) for it in shards.assign_splits(items, SplitSpec(fractions)))
        for c in ("a", "b", "c"):
            for split, f in zip(("train", "val", "test"), fractions):
                share = counts[(c, split)] / 3000
                assert abs(share - f) < 0.03, (fractions, c, split, share)  # binomial sd <= 0.009
                if f == 0:
                    assert counts[(c, split)] == 0


def test_group_by_keeps_a_group_in_one_split_and_an_unmatched_image_is_named():
    items = [Item(None, "x", "x", None, f"NGS/patient_{p:03d}/{i}.png") for p in range(300) for i in range(5)]
    out = shards.assign_splits(items, SplitSpec((0.5, 0.25, 0.25), group_by=r"patient_\d+"))
    per_patient = collections.defaultdict(set)
    for it in out:
        per_patient[it.image_id.split("/")[1]].add(it.split)
    assert all(len(s) == 1 for s in per_patient.values())
    assert {s for (s,) in per_patient.values()} == {"train", "val", "test"}
    grouped = shards.assign_splits(items, SplitSpec((0.5, 0.25, 0.25), group_by=r"/(patient_\d+)/"))
    assert [it.split for it in grouped] == [it.split for it in out]  # first capture group == whole match
    odd = items + [Item(None, "x", "x", None, "NGS/loose.png")]
    with pytest.raises(ShardError, match=r"NGS/loose.png: --group-by 'patient_\\\\d\+' does not match"):
        shards.assign_splits(odd, SplitSpec((0.5, 0.25, 0.25), group_by=r"patient_\d+"))


@pytest.mark.parametrize("text, match", [("0.6,0.2", "expected three numbers"), ("0.6,0.3,0.2", "sum to 1.1, not 1"),
                                         ("1.2,-0.2,0", "between 0 and 1"), ("a,b,c", "expected three numbers")])
def test_bad_split_fractions_are_named(text, match):
    with pytest.raises(ShardError, match=match):
        shards.parse_split_fractions(text)


def test_split_folders_with_split_fractions_or_split_refused(tmp_path):
    lm = get_label_map("matek_aml_2019")
    _tree(tmp_path / "split", ["train/NGS/0.png", "test/MYB/1.png"])
    with pytest.raises(ShardError, match=r"has splits of its own \(train, test\), so each image keeps its split: "
                                         r"drop --split-fractions"):
        shards.folder_items(tmp_path / "split", lm, spec=SplitSpec((0.6, 0.2, 0.2)))
    _tree(tmp_path / "flat", ["NGS/0.png"])
    with pytest.raises(ShardError, match="give --split val or --split-fractions, not both"):
        shards.folder_items(tmp_path / "flat", lm, "val", SplitSpec((0.6, 0.2, 0.2)))
    (tmp_path / "c.csv").write_text("path,label,split\nflat/NGS/0.png,NGS,val\n")
    with pytest.raises(ShardError, match="has splits of its own \\(val\\)"):
        shards.csv_items(tmp_path / "c.csv", lm, spec=SplitSpec((0.6, 0.2, 0.2)))


def test_cli_draws_splits_and_stores_relative_ids(tmp_path, capsys):
    _tree(tmp_path / "flat", [f"NGS/{i}.png" for i in range(40)])
    rc = make_shards(["matek", "--root", str(tmp_path / "flat"), "--out", str(tmp_path / "o2"),
                      "--split-fractions", "0.5,0,0.5", "--split-seed", "7"])
    assert rc == 0 and "test: neutrophil_segmented" in capsys.readouterr().out
    table = shards.read_table(str(tmp_path / "o2"))
    assert sorted(table["image_id"].to_pylist()) == sorted(f"NGS/{i}.png" for i in range(40))
    assert set(table["split"].to_pylist()) == {"train", "test"}


def test_make_shards_takes_quiet_and_verbose_before_or_after_its_sub_command():
    """``make_shards.py pbc ... --quiet`` was refused ("unrecognized arguments") where every other job
    takes the flag anywhere."""
    from hierdino.cli.make_shards import _parser

    p = _parser()
    args = ["--root", "r", "--out", "o"]
    assert p.parse_args(["pbc", *args, "--quiet"]).quiet
    assert p.parse_args(["--quiet", "pbc", *args]).quiet  # not undone by the sub-command's parser
    assert p.parse_args(["synth", "--out", "o", "--verbose"]).verbose
    plain = p.parse_args(["folder", *args, "--source", "s"])
    assert not plain.quiet and not plain.verbose
