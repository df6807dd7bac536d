"""Reproduction v3 (issue #36): variants, data parts and scores (no training)."""

import dataclasses
import io
import random

import numpy as np
import pytest
from PIL import Image

from hierdino.config import load_config, override_text
from hierdino.data import shards
from hierdino.data.parts import assign_parts
from hierdino.experiments import v3
from hierdino.hierarchy import load_hierarchy


def _without(cfg, *keys) -> dict:
    d = dataclasses.asdict(cfg)
    for k in keys:
        section, name = k.split(".", 1)
        d[section].pop(name)
    return d


def test_v3_variants_differ_only_in_the_supervised_loss_and_which_part_carries_labels():
    cfgs = {v: load_config(f"repro/v3/{v}", [f"data.train={override_text(v3.variant_data('/d', v))}"]) for v in v3.VARIANTS}
    base = _without(cfgs["ssl"], "loss.supervised", "data.train")
    for v, cfg in cfgs.items():
        assert _without(cfg, "loss.supervised", "data.train") == base, v
    sup = {v: (c.loss.supervised.kind, c.loss.supervised.weight, c.loss.supervised.alpha, c.loss.supervised.normalize)
           for v, c in cfgs.items()}
    assert sup == {"ssl": ("none", 0.5, 0.5, "path"), "flat": ("flat", 0.5, 0.5, "path"),
                   "hxe": ("hxe", 0.5, 0.5, "path"), "hxe-fine": ("hxe", 0.5, 0.5, "path"),
                   "hxe-sweep": ("hxe", 0.5, None, "path")}
    data = {v: c.data.train for v, c in cfgs.items()}
    for v, uris in data.items():  # the same images in the same order: only the coarse part's labels differ
        assert uris[0] == "/d/pbc-fine" and uris[2] == "/d/pbc-unlabelled", v
    assert {v: uris[1] for v, uris in data.items()} == {
        "ssl": "/d/pbc-coarse", "flat": "/d/pbc-coarse-unlabelled", "hxe": "/d/pbc-coarse",
        "hxe-fine": "/d/pbc-coarse-unlabelled", "hxe-sweep": "/d/pbc-coarse"}
    # the base model is the SSL variant trained longer, from scratch, with no supervised loss
    pre = load_config("repro/v3/pretrain")
    assert pre.loss.supervised.kind == "none" and pre.train.steps == 1200 and pre.model.init_weights is None
    assert _without(pre, "train.steps", "data.train") == _without(cfgs["ssl"], "train.steps", "data.train")
    assert cfgs["hxe"].hierarchy.name == v3.HIERARCHY == "wbc-h2" and cfgs["hxe"].data.center_crop == 0.5


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


LEAVES = {"neutrophil_band": 31, "neutrophil_segmented": 20, "myelocyte": 17, "lymphocyte_typical": 25, "platelet": 12}
NATURAL = {"neutrophil": 6, "granulocytic_normal_immature": 4}


@pytest.fixture()
def pbc_like(tmp_path):
    """A PBC-like set: leaf labels, naturally coarse labels, unlabelled rows, in train/val/test."""
    recs, i = [], 0
    for split, scale in (("train", 1), ("val", 0.2), ("test", 0.2)):
        for lab, n in (LEAVES | NATURAL | {None: 5}).items():
            for _ in range(max(1, int(n * scale))):
                recs.append(shards.Record(_png(i), f"{lab}/{i}.png", "pbc", lab, lab, split))
                i += 1
    random.Random(0).shuffle(recs)
    shards.write_dataset(recs, str(tmp_path / "pbc"), "pbc", "pbc", hierarchy="wbc-h2")
    return str(tmp_path / "pbc"), recs


def _rows(uri):
    return shards.read_table(uri, ["image_id", "label", "split"]).to_pylist()


def test_parts_are_disjoint_make_up_the_train_split_and_coarse_labels_sit_at_depth_3(pbc_like, tmp_path):
    pbc, recs = pbc_like
    h = load_hierarchy("wbc-h2")
    v3.write_parts(pbc, str(tmp_path / "data"))
    parts = {n: _rows(str(tmp_path / "data" / n)) for n in ("pbc-fine", "pbc-coarse", "pbc-coarse-unlabelled", "pbc-unlabelled")}
    ids = {n: {r["image_id"] for r in rows} for n, rows in parts.items()}
    train = {r.image_id: r.label for r in recs if r.split == "train"}
    assert not ids["pbc-fine"] & ids["pbc-coarse"] and not ids["pbc-fine"] & ids["pbc-unlabelled"]
    assert not ids["pbc-coarse"] & ids["pbc-unlabelled"]
    assert ids["pbc-fine"] | ids["pbc-coarse"] | ids["pbc-unlabelled"] == set(train)
    assert ids["pbc-coarse-unlabelled"] == ids["pbc-coarse"]
    assert all(r["split"] == "train" for rows in parts.values() for r in rows)
    # fine: leaves as given, round(20%) of each leaf
    for leaf, n in LEAVES.items():
        assert sum(train[i] == leaf for i in ids["pbc-fine"]) == round(0.2 * n), leaf
        assert sum(train[i] == leaf for i in ids["pbc-coarse"]) == round(0.4 * n), leaf
    assert all(r["label"] == train[r["image_id"]] and h.is_leaf(r["label"]) for r in parts["pbc-fine"])
    # coarse: a leaf's ancestor at depth 3 (platelet, at depth 2, stays); natural coarse labels kept
    expected_depth3 = {"neutrophil_band": "granulocytic_normal_mature", "neutrophil_segmented": "granulocytic_normal_mature",
                       "myelocyte": "granulocytic_normal_immature", "lymphocyte_typical": "lymphocyte_mature",
                       "platelet": "platelet"}
    for r in parts["pbc-coarse"]:
        given = train[r["image_id"]]
        assert r["label"] == expected_depth3.get(given, given), (given, r["label"])
        assert r["label"] in h.ancestors(given) + [given]
        assert h.depth(r["label"]) == 3 or given in NATURAL or h.depth(given) < 3
    assert {train[r["image_id"]] for r in parts["pbc-coarse"]} >= set(NATURAL)  # every natural coarse image is coarse
    assert sum(train[i] in NATURAL for i in ids["pbc-coarse"]) == sum(NATURAL.values())
    assert all(r["label"] is None for n in ("pbc-coarse-unlabelled", "pbc-unlabelled") for r in parts[n])
    # evaluation: every split's leaf-labelled rows and nothing else
    ev = _rows(str(tmp_path / "data" / "pbc-eval"))
    assert {r["image_id"] for r in ev} == {r.image_id for r in recs if r.label in LEAVES}
    assert all(r["label"] == r["image_id"].split("/")[0] for r in ev)


def test_parts_depend_on_the_image_ids_not_their_order():
    h = load_hierarchy("wbc-h2")
    ids = [f"neutrophil_band/{i}.jpg" for i in range(50)] + [f"myelocyte/{i}.jpg" for i in range(50)]
    labels = [i.split("/")[0] for i in ids]
    first = dict(zip(ids, assign_parts(ids, labels, h)))
    order = list(range(100))
    random.Random(3).shuffle(order)
    again = dict(zip([ids[k] for k in order], assign_parts([ids[k] for k in order], [labels[k] for k in order], h)))
    assert first == again
    assert dict(zip(ids, assign_parts(ids, labels, h, seed=1))) != first  # the seed matters
    with pytest.raises(ValueError, match="not in hierarchy"):
        assign_parts(["a"], ["no_such_cell"], h)


def test_fine_class_scores_are_the_mean_recall_over_those_classes():
    y = ["neutrophil_band"] * 4 + ["myelocyte"] * 2 + ["monocyte"] * 4
    pred = ["neutrophil_band"] * 3 + ["monocyte"] + ["myelocyte", "promyelocyte"] + ["monocyte"] * 4
    sets = v3.scored_sets({v3.PBC: {"y_true": y, "m": {"logreg": pred}}})
    fine = sets[v3.PBC_FINE]
    assert v3.bacc(fine["y_true"], fine["m"]["logreg"]) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert v3.bacc(y, pred) == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    assert v3.bacc(sets["pbc:myelocyte"]["y_true"], sets["pbc:myelocyte"]["m"]["logreg"]) == 0.5
    assert np.array_equal(sets["pbc:monocyte"]["y_true"], ["monocyte"] * 4)


def test_report_renders_every_contrast_from_predictions(tmp_path):
    """summarise_v3 + the report on hand-made predictions: PBC with every probe and seed, the synthetic sets
    with knn20 and seed 0 only; (c) is right wherever (b) errs on the fine classes, so (c) - (b) > 0 there."""
    from types import SimpleNamespace

    from hierdino.data.suite import EXTERNAL_SETS
    from hierdino.experiments.stages import write_results

    rng = np.random.default_rng(0)
    leaves = ["neutrophil_band", "neutrophil_segmented", "myelocyte", "monocyte", "platelet"]
    y = [leaves[i % 5] for i in range(100)]
    runs = {v: [f"/r/{v}-s{s}" for s in range(3)] for v in ("ssl", "flat", "hxe", "hxe-fine")}
    probes = ("knn20", "logreg")

    def preds(y_true, labels, wrong):
        return [labels[(labels.index(t) + 1) % len(labels)] if rng.random() < wrong else t for t in y_true]

    pbc = {"y_true": y, "base": {p: preds(y, leaves, 0.3) for p in probes},
           "random-vit_tiny_cpu": {p: preds(y, leaves, 0.6) for p in probes}}
    for v, uris in runs.items():
        for u in uris:
            pbc[u.rsplit("/", 1)[-1]] = {p: preds(y, leaves, 0.0 if v == "hxe" else 0.3) for p in probes}
    predictions, rows = {v3.PBC: pbc}, []
    trees = {"synth-ext-1": "wbc-h1", "synth-ext-2": "wbc-h1", "synth-ood": "synth-ood"}
    for d in EXTERNAL_SETS:
        labels = load_hierarchy(trees[d]).leaves[:3]
        yt = [labels[i % 3] for i in range(60)]
        entry = {"y_true": yt}
        for name in ["base", "random-vit_tiny_cpu"] + [uris[0].rsplit("/", 1)[-1] for uris in runs.values()]:
            entry[name] = {"knn20": preds(yt, labels, 0.2)}
        predictions[d] = entry
    for d, entry in predictions.items():
        rows += [{"model": m, "dataset": d, "probe": p, "tree_feature_spearman": 0.1}
                 for m, per in entry.items() if m != "y_true" for p in per]
    results = {"predictions": predictions, "rows": rows,
               "datasets": {v3.PBC: {"hierarchy": "wbc-h2"}} | {d: {"hierarchy": trees[d]} for d in EXTERNAL_SETS}}
    args = SimpleNamespace(bootstrap=50, t0=0.0)
    setup = {"arch": "vit_tiny_cpu", "image_size": 64, "center_crop": 0.5, "steps": 60, "base_steps": 300,
             "batch_size": 32, "seeds": [0, 1, 2], "device": "2 CPUs", "bootstrap": 50,
             "level_weights_source": "from the val-split sweep"}
    parts = {"seed": 0, "coarse_depth": 3, "fractions": {"fine": 0.2, "coarse": 0.4, "unlabelled": 0.4},
             "counts": {n: {"train": {"x": 1}} for n in ("pbc-fine", "pbc-coarse", "pbc-unlabelled")}}
    s = v3.summarise_v3(args, results, runs, "/r/base", "vit_tiny_cpu", probes, None, parts, setup)
    fine = next(r for r in s["paired"] if (r["x"], r["y"], r["probe"], r["dataset"], r["metric"]) ==
                ("hxe", "flat", "logreg", v3.PBC_FINE, "bacc"))
    assert fine["diff"] > 0.15 and fine["ci95"][0] > 0 and len(fine["per_seed"]) == 3
    synth = [r for r in s["paired"] if r["dataset"] in EXTERNAL_SETS]
    assert synth and all(r["probe"] == "knn20" and len(r["per_seed"]) == 1 for r in synth)
    assert len(s["bacc"]["hxe"]["synth-ood"]["knn20"]) == 1 and len(s["bacc"]["hxe"][v3.PBC]["logreg"]) == 3
    assert s["bacc"]["hxe"][v3.PBC]["logreg"] == [1.0, 1.0, 1.0]
    assert {r["dataset"] for r in s["paired_per_class"]} == {f"pbc:{c}" for c in leaves}
    write_results(SimpleNamespace(out=str(tmp_path), t0=0.0), s, probes)
    md = (tmp_path / "results.md").read_text()
    assert "| (c) HXE, fine + coarse labels - (b) flat CE, fine labels | logreg |" in md
    assert (tmp_path / "plots" / "contrasts.png").stat().st_size > 1000
    # --render rewrites the same report from the stored results.json
    from hierdino.cli import reproduce

    (tmp_path / "results.md").unlink()
    assert reproduce.main(["--design", "v3", "--render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text() == md


def test_a_published_pbc_folder_is_cut_as_make_shards_cuts_it(tmp_path):
    """v3 writes PBC's published folder with the data layer: the same rows, labels and splits as
    ``make_shards pbc --split-fractions 0.6,0.2,0.2 --split-seed 0``."""
    from hierdino.cli.make_shards import main as make_shards

    root = tmp_path / "PBC_dataset_normal_DIB"
    files = [f"{folder}/{prefix}_{i}.jpg" for i, (folder, prefix) in
             enumerate([("neutrophil", "BNE"), ("neutrophil", "SNE"), ("ig", "MY"), ("lymphocyte", "LY"),
                        ("platelet", "PLATELET")] * 6)]
    for i, rel in enumerate(files):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 6, 3), i, np.uint8)).save(root / rel, format="JPEG")
    assert make_shards(["pbc", "--root", str(root), "--out", str(tmp_path / "cli" / "pbc"), "--split-fractions",
                        "0.6,0.2,0.2", "--split-seed", "0"]) == 0
    out = v3.pbc_shards(str(root), str(tmp_path / "v3"))
    assert out == str(tmp_path / "v3" / "pbc")
    assert sorted(_rows(out), key=str) == sorted(_rows(str(tmp_path / "cli" / "pbc")), key=str)
    assert shards.read_manifest(out).counts == shards.read_manifest(str(tmp_path / "cli" / "pbc")).counts
    assert v3.pbc_shards(out, str(tmp_path / "other")) == out  # shards already: used as they are
