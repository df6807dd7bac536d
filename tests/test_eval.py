import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from hierdino.eval.metrics import (
    EncodedPredictions,
    all_metrics,
    bootstrap,
    hierarchical_prf,
    lineage_bacc,
    mistake_severity,
    tree_feature_spearman,
)
from hierdino.eval.probes import fit_predict
from hierdino.hierarchy import hierarchy_from_dict, load_hierarchy

TREE = hierarchy_from_dict({"name": "t", "root": {"A": {"A1": ["a", "b"], "A2": ["c"]}, "B": ["d", "e"]}})


def test_flat_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d", "e"]
    yt = list(rng.choice(classes, 200, p=[0.5, 0.2, 0.15, 0.1, 0.05]))
    yp = [t if rng.random() < 0.6 else rng.choice(classes) for t in yt]
    m = EncodedPredictions(yt, yp, TREE).metrics()
    assert m["acc"] == pytest.approx(accuracy_score(yt, yp))
    assert m["bacc"] == pytest.approx(balanced_accuracy_score(yt, yp))
    assert m["f1w"] == pytest.approx(f1_score(yt, yp, average="weighted"))
    assert m == pytest.approx(all_metrics(yt, yp, TREE))


def test_hierarchical_metrics_known_answers():
    # a->b: LCA A1, depth(a)=3 -> severity 1; a->c: LCA A -> 2; a->d: LCA root -> 3
    assert mistake_severity(["a", "a", "a", "a"], ["a", "b", "c", "d"], TREE) == (2.0, [1, 2, 3])
    assert mistake_severity(["a"], ["a"], TREE)[0] == 0.0
    # ancestor sets: a={A,A1,a}, b={A,A1,b}: overlap 2 of 3 each
    assert hierarchical_prf(["a"], ["b"], TREE) == pytest.approx({"hP": 2 / 3, "hR": 2 / 3, "hF1": 2 / 3})
    # d={B,d} predicted for a={A,A1,a}: overlap 0
    assert hierarchical_prf(["a", "d"], ["d", "d"], TREE) == pytest.approx({"hP": 2 / 4, "hR": 2 / 5, "hF1": 2 * 0.5 * 0.4 / 0.9})
    assert lineage_bacc(["a", "c", "d", "e"], ["b", "d", "e", "d"], TREE) == pytest.approx((0.5 + 1.0) / 2)


def test_spearman_tree_vs_centroids():
    labels = ["a"] * 5 + ["b"] * 5 + ["c"] * 5 + ["d"] * 5
    # centroids placed so feature distance grows with tree distance
    pos = {"a": 0.0, "b": 1.0, "c": 3.0, "d": 10.0}
    feats = np.array([[pos[x] + 0.01 * i, 0.0] for i, x in enumerate(labels)])
    assert tree_feature_spearman(feats, labels, TREE) > 0.8
    assert np.isnan(tree_feature_spearman(feats[:10], labels[:10], TREE))


def test_bootstrap_intervals_contain_point_and_narrow_with_more_data():
    rng = np.random.default_rng(1)
    h = load_hierarchy("wbc-h1")
    classes = h.leaves[:6]

    def sample(n):
        yt = list(rng.choice(classes, n))
        return yt, [t if rng.random() < 0.7 else rng.choice(classes) for t in yt]

    small, large = sample(100), sample(2000)
    ci_small, ci_large = bootstrap(*small, h, n=1000, seed=0), bootstrap(*large, h, n=1000, seed=0)
    for (yt, yp), ci in ((small, ci_small), (large, ci_large)):
        point = EncodedPredictions(yt, yp, h).metrics()
        for k in ("acc", "bacc", "hF1", "severity"):
            assert ci[k][0] <= point[k] <= ci[k][1], k
    width = lambda ci: ci["acc"][1] - ci["acc"][0]  # noqa: E731
    assert width(ci_large) < 0.5 * width(ci_small)
    assert bootstrap(*small, h, n=200, seed=3) == bootstrap(*small, h, n=200, seed=3)


def test_probes_separate_clusters():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (40, 5)) + [8, 0, 0, 0, 0], rng.normal(0, 1, (40, 5)) + [0, 8, 0, 0, 0]])
    y = np.array(["a"] * 40 + ["d"] * 40)
    for probe in ("knn1", "knn20", "logreg"):
        assert (fit_predict(probe, x[::2], y[::2], x[1::2]) == y[1::2]).mean() > 0.95
    assert (fit_predict("knn20", x[::2], y[::2], x[1::2], metric="cosine") == y[1::2]).mean() > 0.9
    with pytest.raises(ValueError, match="unknown probe 'svm'"):
        fit_predict("svm", x, y, x)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A tiny untrained model exported in the run-directory layout."""
    from exports import write_tiny_export

    return write_tiny_export(tmp_path_factory.mktemp("runs") / "tiny")


def test_end_to_end_evaluation_with_plots_and_cache(ray_cluster, synth_suite, tiny_export, tmp_path, said):
    from hierdino.data.suite import resolve_dataset
    from hierdino.eval.report import evaluate

    datasets = [resolve_dataset(n, synth_suite) for n in ("synth-ext-1", "synth-ood")]
    # features in this process (the v2 reproduction's path); Ray Data's are checked against them below
    res = evaluate([str(tiny_export), "pixels"], datasets, str(tmp_path), "val", bootstrap_n=200, in_process=True)
    assert len(res["rows"]) == 2 * 2 * 3
    data = json.loads((tmp_path / "results.json").read_text())
    row = data["rows"][0]
    assert set(row["metrics"]) >= {"bacc", "acc", "f1w", "severity", "hF1", "lineage_bacc"}
    assert row["metrics"]["bacc"]["ci95"][0] <= row["metrics"]["bacc"]["value"] <= row["metrics"]["bacc"]["ci95"][1]
    md = (tmp_path / "results.md").read_text()
    assert "| tiny | synth-ext-1 |" in md and "| pixels | synth-ood |" in md
    pngs = sorted(Path(tmp_path, "plots").glob("*.png"))
    assert len(pngs) == 2 * 2 * 2 + 2 and all(p.stat().st_size > 5000 for p in pngs)
    assert sum("features:" in line for line in said) == 4
    said.clear()
    res2 = evaluate([str(tiny_export), "pixels"], datasets, str(tmp_path), "val", bootstrap_n=200, plots=False)
    assert not any("features:" in line for line in said)  # every feature came from the cache
    assert res2["rows"] == res["rows"]
    # Ray Data's features (the cluster path) equal those computed in this process, image by image
    from hierdino.eval.features import dataset_features, resolve_model

    spec = resolve_model(str(tiny_export), 64)
    cached = dataset_features(spec, datasets[0], str(tmp_path / "features"), in_process=True)
    assert not any("features:" in line for line in said)  # read from the cache the first evaluation wrote
    ray_data = dataset_features(spec, datasets[0], None)
    a, b = np.argsort(ray_data.image_ids), np.argsort(cached.image_ids)
    assert list(ray_data.image_ids[a]) == list(cached.image_ids[b]) and len(a) == len(set(cached.image_ids))
    np.testing.assert_allclose(cached.features[b], ray_data.features[a], rtol=1e-4, atol=1e-5)
    assert list(cached.labels[b]) == list(ray_data.labels[a]) and list(cached.splits[b]) == list(ray_data.splits[a])


def test_eval_features_auto_stays_in_process_on_a_one_node_cpu_cluster(ray_cluster):
    from hierdino.eval.features import features_in_process

    assert not ray_cluster.cluster_resources().get("GPU") and len(ray_cluster.nodes()) == 1
    assert features_in_process("auto") and features_in_process("local") and not features_in_process("ray")


def test_bad_model_spec_is_clear(tmp_path):
    from hierdino.eval.features import resolve_model

    with pytest.raises(FileNotFoundError, match="no .*model.json"):
        resolve_model(str(tmp_path))


def test_external_sets_the_probes_cannot_use_and_undecodable_images_are_named(tmp_path, monkeypatch):
    import io as _io

    from PIL import Image

    from hierdino.data.shards import Record, write_dataset
    from hierdino.eval import EvalDataError
    from hierdino.eval.decode import decode_images
    from hierdino.eval.features import resolve_model
    from hierdino.eval.sets import check_probe_sets

    buf = _io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    # what `make_shards folder` writes by default: one split, here with one class
    write_dataset([Record(png, f"i{k}", "s", "a", "neutrophil", "train") for k in range(3)], str(tmp_path / "one"), "one", "s")
    write_dataset([Record(png, f"j{k}", "s", "a", lab, split) for k, (lab, split) in
                   enumerate([("neutrophil", "train"), ("monocyte", "train"), ("monocyte", "val")])], str(tmp_path / "ok"), "ok", "s")
    check_probe_sets([str(tmp_path / "ok")], "val")
    with pytest.raises(EvalDataError, match=r"(?s)one: 1 labelled class\(es\) in its 'train' split.*one: no labelled 'val' rows"):
        check_probe_sets([str(tmp_path / "one"), str(tmp_path / "ok")], "val")
    assert decode_images([png, png], 4).shape == (2, 4, 4, 3)
    with pytest.raises(EvalDataError, match=r"1 of 2 evaluation image\(s\) could not be decoded.*cell-7"):
        decode_images([png, b"not an image"], 4, ["cell-1", "cell-7"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "lr=0.1").mkdir(parents=True)  # a run directory whose name has '=': not <arch>=<weights>
    with pytest.raises(FileNotFoundError, match=r"no runs/lr=0.1/export/model.json"):
        resolve_model("runs/lr=0.1")


def test_plots_keep_internal_node_labels_in_tree_order():
    from hierdino.eval.plots import tree_order

    h = load_hierarchy("wbc-h1")
    # a Raabin-style set labels 'neutrophil' (internal) beside leaves: it is plotted, before its own child
    got = tree_order(h, {"neutrophil_band", "monocyte", "neutrophil", "lymphocyte_typical"})
    assert got == ["lymphocyte_typical", "monocyte", "neutrophil", "neutrophil_band"]
    assert h.parent("neutrophil_band") == "neutrophil" and not h.is_leaf("neutrophil")


def _png(value: int) -> bytes:
    import io as _io

    from PIL import Image

    buf = _io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_set_written_with_a_tree_of_ones_own_is_scored_on_that_tree(tmp_path):
    """``make_shards`` stores the tree in the manifest, so a set labelled on a hierarchy file of the
    user's own is evaluated without the file (lineage bAcc on that tree, by hand); a set written
    before trees were stored needs the file (--hierarchy), said before any feature is computed."""
    from hierdino.cli import make_shards
    from hierdino.eval import EvalDataError
    from hierdino.eval.report import evaluate
    from hierdino.eval.sets import check_probe_sets

    (tmp_path / "tree.yaml").write_text("name: my-tree\nroot:\n  red: [r1, r2]\n  blue: [b1]\n")
    (tmp_path / "maps.yaml").write_text("mine:\n  R1: r1\n  R2: r2\n  B1: b1\n")
    rows = ["path,label,split"]
    for i, (raw, split) in enumerate([(r, s) for s in ("train", "train", "test") for r in ("R1", "R2", "B1")]):
        (tmp_path / f"{i}.png").write_bytes(_png(40 * ("R1", "R2", "B1").index(raw) + i % 3))
        rows.append(f"{i}.png,{raw},{split}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "set"
    assert make_shards.main(["csv", "--csv", str(tmp_path / "labels.csv"), "--source", "mine", "--label-maps",
                             str(tmp_path / "maps.yaml"), "--hierarchy", str(tmp_path / "tree.yaml"), "--out", str(out)]) == 0
    res = evaluate(["pixels"], [str(out)], str(tmp_path / "ev"), "test", probes=("knn1",), bootstrap_n=20, plots=False,
                   in_process=True)
    assert res["datasets"]["set"]["hierarchy"] == "my-tree"
    m = res["rows"][0]["metrics"]
    # kNN-1 on pixels: each test image's nearest train image has its grey level, so its class
    assert m["bacc"]["value"] == 1.0 and m["lineage_bacc"]["value"] == 1.0

    manifest = json.loads((out / "manifest.json").read_text())  # as written before trees were stored
    del manifest["extra"]["hierarchy_tree"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EvalDataError, match=r"names the hierarchy 'my-tree', which is not packaged.*--hierarchy FILE"):
        check_probe_sets([str(out)], "test")
    res = evaluate(["pixels"], [str(out)], str(tmp_path / "ev2"), "test", probes=("knn1",), bootstrap_n=20, plots=False,
                   in_process=True, hierarchies=(str(tmp_path / "tree.yaml"),))
    assert res["datasets"]["set"]["hierarchy"] == "my-tree"
    h = load_hierarchy("wbc-h1")  # the stored form reads back as the same tree
    again = hierarchy_from_dict(h.to_dict())
    assert again.nodes == h.nodes and all(again.parent(n) == h.parent(n) for n in h.nodes)


def test_sets_with_one_name_stay_apart_results_are_strict_json_and_a_damaged_cache_is_recomputed(tmp_path, said):
    """Two sets both named 'shards' get rows each; a 2-class set's tree correlation (undefined) is
    null, not NaN; k-NN over fewer training rows than k is said; a feature cache cut short is computed
    again, with the same rows."""
    from hierdino.data.shards import Record, write_dataset
    from hierdino.eval.report import evaluate

    uris = []
    for k in range(2):
        uri = str(tmp_path / f"site{k}" / "shards")
        write_dataset([Record(_png(100 * (lab == "monocyte") + i + k), f"i{i}", "s", "a", lab, split)
                       for i, (lab, split) in enumerate([(lab, s) for s in ("train", "test") for lab in
                                                         ("neutrophil", "monocyte")] * (2 + k))], uri, "shards", "s")
        uris.append(uri)
    res = evaluate(["pixels"], uris, str(tmp_path / "ev"), "test", probes=("knn1", "knn20"), bootstrap_n=20,
                   plots=False, in_process=True)
    assert [(r["dataset"], r["n"], r["probe"]) for r in res["rows"]] == [
        ("shards#0", 4, "knn1"), ("shards#0", 4, "knn20"), ("shards#1", 6, "knn1"), ("shards#1", 6, "knn20")]
    assert "[hierdino] note: shards#0 has 4 labelled train rows: knn20 vote over all of them" in said
    assert {k: v["uri"] for k, v in res["datasets"].items()} == {"shards#0": uris[0], "shards#1": uris[1]}
    text = (tmp_path / "ev" / "results.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    assert data["rows"][0]["tree_feature_spearman"] is None
    cache = sorted((tmp_path / "ev" / "features").glob("shards-*.npz"))
    assert len(cache) == 2
    cache[0].write_bytes(cache[0].read_bytes()[:100])
    said.clear()
    again = evaluate(["pixels"], uris, str(tmp_path / "ev"), "test", probes=("knn1", "knn20"), bootstrap_n=20,
                     plots=False, in_process=True)
    assert len(again["rows"]) == 4 and (tmp_path / "ev" / "results.json").read_text() == text
    assert sum("is unreadable" in line for line in said) == 1 and sum("features:" in line for line in said) == 1


def test_plain_vits_load_without_layerscale_and_other_model_families_are_named():
    """A ViT without LayerScale (timm's vit_*_224 layout) loads for evaluation and gives that model's
    features; a training backbone with LayerScale says which setting fits it; a ResNet is refused by name."""
    import safetensors.torch
    import torch

    from hierdino.eval.features import load_backbone, resolve_model
    from hierdino.models.backbone import build_backbone, load_pretrained
    from hierdino.models.weights import WeightsError

    plain = build_backbone("vit_micro_cpu", 32, 0.0, None).eval()
    assert not any("ls1" in k for k in plain.vit.state_dict())
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/plain.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in plain.vit.state_dict().items()}, path)
        spec = resolve_model(f"vit_micro_cpu@32={path}")
        assert (spec.arch, spec.img_size) == ("vit_micro_cpu", 32)
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(load_backbone(spec)(x)[0], plain(x)[0])
        with pytest.raises(WeightsError, match="no LayerScale .* set model.layerscale_init=null"):
            load_pretrained(build_backbone("vit_micro_cpu", 32), path)
        from hierdino.config import load_config

        null = load_config("tiny-cpu", ["model.layerscale_init=null"]).model.layerscale_init
        assert null is None and load_pretrained(build_backbone("vit_micro_cpu", 32, 0.0, null), path).exact
    with pytest.raises(ValueError, match="'resnet18' is not a timm VisionTransformer"):
        build_backbone("resnet18", 224)
    with pytest.raises(ValueError, match="after '@' must be a positive integer"):
        resolve_model("random:vit_micro_cpu@big")


def test_input_errors_met_by_ray_data_actors_and_tasks_are_said_as_in_process(ray_cluster, tmp_path, capsys):
    """On the Ray Data path (GPU or multi-node clusters) an undecodable image and weights that do not
    load give the one-line error and exit 2 of the in-process path, not a Ray traceback: Ray keeps
    only the text of an error raised in an actor or task."""
    from hierdino.cli import evaluate as cli
    from hierdino.data.shards import Record, write_dataset

    records = [Record(_png(40 * i), f"i{i}", "s", "a", lab, split)
               for i, (lab, split) in enumerate([(lab, s) for s in ("train", "test") for lab in ("neutrophil", "monocyte")])]
    write_dataset(records + [Record(b"not an image", "cell-bad", "s", "a", "monocyte", "test")], str(tmp_path / "bad"),
                  "bad", "s")
    for where in ("ray", "local"):
        assert cli.main(["--model", "pixels", "--datasets", str(tmp_path / "bad"), "--out", str(tmp_path / where),
                         "--features", where, "--no-plots"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: 1 of 5 evaluation image(s) of {tmp_path / 'bad'} could not be decoded") \
            and "cell-bad (UnidentifiedImageError" in err and "Traceback" not in err, err
    write_dataset(records, str(tmp_path / "ok"), "ok", "s")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert cli.main(["--model", f"vit_micro_cpu@32={tmp_path / 'cut.safetensors'}", "--datasets", str(tmp_path / "ok"),
                     "--out", str(tmp_path / "w"), "--features", "ray", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'cut.safetensors'}: not a safetensors file") and "Traceback" not in err, err


def test_per_class_recall_is_each_class_share_predicted_as_itself():
    """Hand counts: 3 of 4 'a' right, 0 of 2 'b', 1 of 1 'c'; bAcc is their mean; the interval of a
    class predicted always (or never) right has no width."""
    from hierdino.eval.metrics import per_class_recall

    y_true = ["a", "a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "a", "b", "a", "c", "c"]
    r = per_class_recall(y_true, y_pred, n=200)
    assert {c: r[c]["value"] for c in r} == {"a": 0.75, "b": 0.0, "c": 1.0}
    assert {c: r[c]["n_images"] for c in r} == {"a": 4, "b": 2, "c": 1}
    assert r["b"]["ci95"] == [0.0, 0.0] and r["c"]["ci95"] == [1.0, 1.0]
    assert 0.0 <= r["a"]["ci95"][0] < 0.75 < r["a"]["ci95"][1] <= 1.0
