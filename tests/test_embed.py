"""jobs/embed.py: embeddings and hierarchical predictions, each checked against an independent reference:
the timm model run directly, hand-computed node probabilities, a calibration on a synthetic probability
model checked on held-out rows, a corrupt image among good ones, resume, an S3 round trip, and the
shared PBC images with the default-size synthetic external sets written to S3 and read back."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from PIL import Image
from test_real_pbc import PBC

from hierdino import storage
from hierdino.hierarchy import hierarchy_from_dict

TREE = {"name": "tiny5", "root": {"lymph": ["B", "T"], "myelo": {"gran": ["neu", "eos"], "mono": None}}}
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory with an untrained vit_micro_cpu@64 teacher and a supervised head on the 5-leaf tree."""
    import torch
    from exports import write_tiny_export

    from hierdino.models.head_export import write_head

    run = write_tiny_export(tmp_path_factory.mktemp("runs") / "tiny-head", seed=3)
    h = hierarchy_from_dict(TREE)
    write_head(str(run / "export"), torch.randn(5, 48), torch.randn(5), h, {"img_size": 64, "center_crop": 1.0})
    return run


def _images(folder, n=7, sizes=((40, 48), (64, 64), (30, 90))):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        arr = (np.random.default_rng(i).random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"cell_{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two image folders: ``good`` (7 PNGs in two subfolders) and ``mixed`` (the same plus one corrupt file)."""
    root = tmp_path_factory.mktemp("imgs")
    for name in ("good", "mixed"):
        _images(root / name / "a", 4)
        _images(root / name / "b", 3)
    (root / "mixed" / "a" / "cell_99.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def _read(out, options=None) -> dict:
    """The rows of every part file under ``out``, by image id."""
    rows = {}
    for name in sorted(storage.file_sizes(out, options)):
        if name.endswith(".parquet"):
            t = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, name), options)))
            rows.update({r["image_id"]: r for r in t.to_pylist()})
    return rows


def _reference(run, files) -> tuple[np.ndarray, np.ndarray]:
    """CLS and mean patch token of the timm model built from the export, on images decoded and
    normalised here (PIL bicubic resize to 64 px, ImageNet mean/std)."""
    import timm
    import torch

    import hierdino.models.backbone  # noqa: F401  (registers the tiny archs with timm)

    model = timm.create_model("vit_micro_cpu", pretrained=True, num_classes=0, img_size=64,
                              pretrained_cfg_overlay={"file": str(run / "export" / "teacher_backbone.safetensors")}).eval()
    x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((64, 64), Image.BICUBIC)) / 255.0 for f in files])
    x = torch.from_numpy(((x - MEAN) / STD).transpose(0, 3, 1, 2)).float()
    with torch.no_grad():
        t = model.forward_features(x)
    return t[:, 0].numpy(), t[:, 1:].mean(1).numpy()


def test_embeddings_equal_the_timm_model_run_directly(ray_cluster, tiny_run, folders, tmp_path):
    from hierdino.eval.embed import EmbedOptions, run_embed
    from hierdino.eval.features import resolve_model

    out = str(tmp_path / "emb")
    s = run_embed(resolve_model(str(tiny_run)), [str(folders / "good")], out,
                  EmbedOptions(dtype="float32", patch_mean=True, files_per_part=3))
    assert (s["files"], s["written"], s["images"], s["undecodable"]) == (3, 3, 7, 0)
    assert 0 < s["first_batch_s"] <= s["pool_up_s"] <= s["last_batch_s"] <= s["seconds"] and s["steady_images"] < 7
    rows = _read(out)
    ids = sorted(rows)
    assert ids == [f"a/cell_{i:02d}.png" for i in range(4)] + [f"b/cell_{i:02d}.png" for i in range(3)]
    cls, patch = _reference(tiny_run, [folders / "good" / i for i in ids])
    got_cls = np.array([rows[i]["embedding"] for i in ids])
    got_patch = np.array([rows[i]["patch_mean"] for i in ids])
    diff = max(np.abs(got_cls - cls).max(), np.abs(got_patch - patch).max())
    print(f"max abs diff embed vs timm directly: {diff:.2e}")
    assert diff < 1e-4
    assert rows[ids[0]]["source_uri"] == str(folders / "good" / ids[0]) and rows[ids[0]]["label"] is None
    meta = json.loads(pq.read_schema(f"{out}/part-000-00000.parquet").metadata[b"hierdino.embed"])
    assert meta["dim"] == 48 and meta["dtype"] == "float32"


@pytest.mark.parametrize("module", ["hierdino.eval.embed", "hierdino.eval.decode"])
def test_read_and_decode_tasks_start_without_torch(module):
    """The read tasks' workers import ``hierdino.eval.embed`` only, the CPU decode tasks of a GPU pool
    ``hierdino.eval.decode``: without torch and timm they start in a fraction of the time and memory
    (0.3 s and 70 MB against 1.9 s and 550 MB with torch, here)."""
    code = f"import sys, {module}; print([m for m in ('torch', 'timm') if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("[]"), r.stdout + r.stderr


def test_corrupt_image_is_one_error_row_and_resume_writes_only_the_rest(ray_cluster, tiny_run, folders, tmp_path, capsys):
    from hierdino.eval.embed import EmbedOptions, run_embed, summary_text
    from hierdino.eval.features import resolve_model

    model = resolve_model(str(tiny_run))
    opts = EmbedOptions(files_per_part=3)
    clean, mixed = str(tmp_path / "clean"), str(tmp_path / "mixed")
    run_embed(model, [str(folders / "good")], clean, opts)
    s = run_embed(model, [str(folders / "mixed")], mixed, opts)
    assert s["undecodable"] == 1 and "a/cell_99.jpg (UnidentifiedImageError" in s["first_undecodable"][0]
    assert "1 image(s) did not decode" in summary_text(s)
    good, rows = _read(clean), _read(mixed)
    bad = rows.pop("a/cell_99.jpg")
    assert bad["embedding"] is None and bad["error"].startswith("UnidentifiedImageError")
    assert rows.keys() == good.keys()
    for k in good:
        assert rows[k]["embedding"] == good[k]["embedding"] and rows[k]["error"] is None
    # resume: as if killed after the other files were written; the rerun writes only the missing one
    before = {n: (tmp_path / "mixed" / n).stat().st_mtime_ns for n in ("part-000-00000.parquet", "part-000-00002.parquet")}
    (tmp_path / "mixed" / "part-000-00001.parquet").unlink()
    s2 = run_embed(model, [str(folders / "mixed")], mixed, opts)
    assert (s2["written"], s2["skipped_complete"], s2["images"]) == (1, 2, 3)
    assert {n: (tmp_path / "mixed" / n).stat().st_mtime_ns for n in before} == before
    again = _read(mixed)
    assert again.keys() == rows.keys() | {"a/cell_99.jpg"}
    assert all(again[k]["embedding"] == rows[k]["embedding"] for k in rows)
    # changed settings are refused before any work, naming what differs
    with pytest.raises(ValueError, match=r"other settings \(dtype: 'float16' there, 'float32' now\)"):
        run_embed(model, [str(folders / "mixed")], mixed, EmbedOptions(dtype="float32", files_per_part=3))


def test_node_probabilities_and_calls_by_hand():
    from hierdino.eval import predict

    h = hierarchy_from_dict(TREE)
    assert h.leaves == ["B", "T", "neu", "eos", "mono"]
    p = np.array([[0.1, 0.2, 0.3, 0.15, 0.25], [0.05, 0.05, 0.8, 0.05, 0.05]])
    node = dict(zip(predict.node_names(h), predict.node_probabilities(p, h).T))
    hand = {"root": [1.0, 1.0], "lymph": [0.3, 0.1], "myelo": [0.7, 0.9], "gran": [0.45, 0.85], "B": [0.1, 0.05],
            "T": [0.2, 0.05], "neu": [0.3, 0.8], "eos": [0.15, 0.05], "mono": [0.25, 0.05]}
    for name, want in hand.items():
        assert np.allclose(node[name], want), name
    names, probs = predict.top_k(p, h, 3)
    assert names[0].tolist() == ["neu", "mono", "T"] and np.allclose(probs[0], [0.3, 0.25, 0.2])
    for tau, want in [(0.95, ["root", "root"]), (0.6, ["myelo", "neu"]), (0.4, ["gran", "neu"]), (0.25, ["neu", "neu"])]:
        call, depth, _ = predict.hierarchical_call(predict.node_probabilities(p, h), h, tau)
        assert call.tolist() == want, tau
    assert depth.tolist() == [3, 3]
    logits = np.array([[1.0, 0.0, 2.0, -1.0, 0.5]])
    e = np.exp(logits[0])
    assert np.allclose(predict.leaf_probabilities(logits, np.eye(5), np.zeros(5))[0], e / e.sum())


def test_calibration_reaches_its_precision_on_held_out_rows():
    """A perfectly calibrated synthetic model (labels drawn from its own leaf probabilities): tau chosen
    on one half reaches the target precision on the other half within 3 standard errors."""
    from hierdino.eval import predict

    h = hierarchy_from_dict(TREE)
    rng = np.random.default_rng(0)
    n = 6000
    logits = rng.normal(0, 1.5, (n, 5)) + 3.0 * np.eye(5)[rng.integers(0, 5, n)]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([h.leaves[rng.choice(5, p=row)] for row in p], dtype=object)
    coarse = np.isin(labels, ["neu", "eos"]) & (rng.random(n) < 0.3)
    labels[coarse] = "gran"  # some labels at an internal node, as external sets give
    for target in (0.9, 0.95):
        cal = predict.calibrate(p[: n // 2], list(labels[: n // 2]), h, target)
        held = predict.accuracy_coverage(p[n // 2:], list(labels[n // 2:]), h, [cal["tau"]])[0]
        called = held["coverage"] * (n // 2)
        se = np.sqrt(target * (1 - target) / called)
        print(f"target {target}: tau {cal['tau']:g}, held-out precision {held['precision']:.4f} (3 SE {3 * se:.4f}), "
              f"coverage {held['coverage']:.3f}")
        assert held["precision"] >= target - 3 * se, (target, cal["tau"], held)
        assert 0.05 < held["coverage"] <= 1 and cal["coverage_by_depth"][1] >= cal["coverage_by_depth"][3]
    flat = np.full((200, 5), 0.2)  # calls myelo (0.6) or nothing: precision about 3/5, whatever tau
    with pytest.raises(ValueError, match=r"no tau reaches precision 0.99 on the 200 calibration images \(best 0.6"):
        predict.calibrate(flat, [h.leaves[i % 5] for i in range(200)], h, 0.99)


def test_head_tree_mismatch_is_refused_in_one_line(tiny_run, tmp_path):
    import shutil

    from hierdino.models.head_export import read_head

    bad = tmp_path / "export"
    shutil.copytree(tiny_run / "export", bad)
    info = json.loads((bad / "head.json").read_text())
    info["hierarchy"]["root"]["lymph"]["NK"] = None
    info["leaves"] = hierarchy_from_dict(info["hierarchy"]).leaves
    (bad / "head.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"^head/tree mismatch: .* has 5 outputs x 48 inputs, the tree 'tiny5' .* 6 "
                                         r"leaves and in_dim 48$"):
        read_head(str(bad / "teacher_backbone.safetensors"))
    with pytest.raises(ValueError, match="head/backbone mismatch: .* takes 48-d CLS tokens, the backbone gives 96-d"):
        read_head(str(tiny_run / "export" / "teacher_backbone.safetensors"), 96)


def _labelled_shards(uri, folder, options=None):
    from hierdino.data.shards import Record, write_dataset

    files = sorted(folder.rglob("*.png"))
    labels = ["B", "T", "neu", "eos", "mono", "gran", "lymph"]
    recs = [Record(f.read_bytes(), f"{i}", "toy", None, labels[i % len(labels)], ["val", "train"][i % 2])
            for i, f in enumerate(files)]
    write_dataset(recs, uri, "toy", "toy", options=options, extra={"hierarchy_tree": TREE})


def test_predict_on_shards_with_calibration(ray_cluster, tiny_run, folders, tmp_path):
    from hierdino.eval import predict
    from hierdino.eval.embed import EmbedOptions, run_embed
    from hierdino.eval.features import resolve_model

    data = str(tmp_path / "toy")
    _labelled_shards(data, folders / "good")
    out = str(tmp_path / "pred")
    s = run_embed(resolve_model(str(tiny_run)), [data], out,
                  EmbedOptions(predict=True, calibrate=data, target_precision=0.05))
    meta = json.loads((tmp_path / "pred" / "embed.json").read_text())
    assert meta["calibration"]["tau"] == s["tau"] and meta["settings"]["tau"] == s["tau"]
    assert set(meta["calibration"]["coverage_by_depth"]) == {"1", "2", "3"}
    h = hierarchy_from_dict(meta["hierarchy"])
    rows = _read(out)
    assert len(rows) == 7 and {r["label"] for r in rows.values()} >= {"B", "gran"}
    for r in rows.values():
        leaf, node = np.array(r["leaf_probs"]), np.array(r["node_probs"])
        assert np.allclose(node, predict.node_probabilities(leaf[None], h)[0], atol=1e-6) and abs(node[0] - 1) < 1e-5
        call, depth, _ = predict.hierarchical_call(node[None].astype(np.float64), h, s["tau"])
        assert (r["call"], r["call_depth"]) == (call[0], depth[0])
        assert r["top3_leaves"][0] == h.leaves[int(leaf.argmax())]
    # jobs/evaluate.py reports the calls of a model with a head
    from hierdino.eval.report import evaluate

    res = evaluate([str(tiny_run)], [data], str(tmp_path / "report"), "val", ("knn1",), bootstrap_n=20,
                   in_process=True)
    (calls,) = res["hierarchical_calls"]
    assert calls["n"] == 4 and (tmp_path / "report" / "calls_tiny-head_toy.png").exists()
    assert "Hierarchical calls of `tiny-head`" in (tmp_path / "report" / "results.md").read_text()


def test_s3_round_trip_and_unwritable_output(ray_cluster, s3_server, tiny_run, folders, tmp_path):
    from hierdino.eval.embed import EmbedOptions, check_writable, run_embed
    from hierdino.eval.features import resolve_model

    s3_server.create_bucket("embed")
    opts = storage.StorageOptions(**s3_server.storage_options())
    for f in sorted((folders / "good").rglob("*.png")):
        storage.upload_file(str(f), f"s3://embed/cells/{f.relative_to(folders / 'good')}", opts)
    model = resolve_model(str(tiny_run))
    s = run_embed(model, ["s3://embed/cells"], "s3://embed/emb", EmbedOptions(files_per_part=4), opts)
    assert (s["written"], s["images"]) == (2, 7)
    local = str(tmp_path / "local")
    run_embed(model, [str(folders / "good")], local, EmbedOptions(files_per_part=4))
    remote, here = _read("s3://embed/emb", opts), _read(local)
    assert remote.keys() == here.keys()
    assert all(remote[k]["embedding"] == here[k]["embedding"] for k in here)
    assert remote["a/cell_00.png"]["source_uri"] == "s3://embed/cells/a/cell_00.png"
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        check_writable("s3://no-such-bucket/emb", opts)


def test_export_carries_the_supervised_head_and_its_tree(tmp_path):
    """A run's export: the head and tree read back give the leaf probabilities of the model's own
    teacher backbone + supervised head on the same input."""
    import torch

    from hierdino.config import load_config
    from hierdino.eval import predict
    from hierdino.eval.features import load_backbone, resolve_model
    from hierdino.hierarchy import load_hierarchy
    from hierdino.models.student_teacher import StudentTeacher
    from hierdino.train.export import export_teacher

    cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu"])
    torch.manual_seed(0)
    m = StudentTeacher(cfg, load_hierarchy("wbc-h1")).eval()
    assert m.sup_head is not None
    torch.nn.init.normal_(m.sup_head.linear.bias)
    export_teacher(m, str(tmp_path / "run"), 0, "wbc-h1", cfg.data.image_size)
    info = json.loads((tmp_path / "run" / "export" / "model.json").read_text())
    assert info["head"] == "head.json"
    spec = resolve_model(str(tmp_path / "run"))
    head = predict.model_head(spec)
    assert head.hierarchy.leaves == load_hierarchy("wbc-h1").leaves
    x = torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        want = torch.softmax(m.sup_head(m.teacher["backbone"](x)[0]), dim=1).numpy()
        cls = load_backbone(spec)(x)[0].numpy()
    got = predict.leaf_probabilities(cls, head.weight, head.bias)
    assert np.abs(got - want).max() < 1e-5


def test_head_report_table_and_plot(tmp_path):
    from hierdino.eval import predict
    from hierdino.eval.features import DatasetFeatures
    from hierdino.models.head_export import Head

    h = hierarchy_from_dict(TREE)
    rng = np.random.default_rng(1)
    y = np.array([h.leaves[i % 5] for i in range(200)], dtype=object)
    w = np.eye(5, 8) * 4.0  # CLS dims 0-4 point at the leaves
    x = rng.normal(0, 1, (200, 8)) + np.eye(5, 8)[[h.leaves.index(lab) for lab in y]] * 1.5
    feats = DatasetFeatures(x.astype(np.float32), y, np.array(["val", "test"] * 100, dtype=object), np.arange(200))
    t = predict.head_report(Head(w.astype(np.float32), np.zeros(5, np.float32), h, "k", "mem"), feats, "m", "toy",
                            "test", str(tmp_path))
    assert t["n"] == 100 and [r["tau"] for r in t["rows"]] == list(predict.REPORT_TAUS)
    assert "tau" in t["calibrated"] or "error" in t["calibrated"]
    lines = "\n".join(predict.coverage_markdown("m", "toy", t))
    assert "| tau | coverage | leaf coverage | precision of calls |" in lines and "flat argmax" in lines
    assert (tmp_path / "calls_m_toy.png").stat().st_size > 1000


def _table(out, options) -> pa.Table:
    """Every part file under ``out``, concatenated (duplicates kept, to be counted)."""
    names = sorted(n for n in storage.file_sizes(out, options) if n.endswith(".parquet"))
    return pa.concat_tables(pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, n), options))) for n in names)


@pytest.mark.skipif(not PBC.is_dir(), reason=f"the shared PBC images are not at {PBC} (set HIERDINO_PBC_ROOT)")
def test_pbc_folder_and_default_external_sets_embed_to_s3_and_read_back(ray_cluster, s3_server, tmp_path):
    """``jobs/embed.py`` with a random vit_tiny_cpu@64 on the shared PBC images (the plain folder as
    ``--data``: the path under it is the id) and the default-size synthetic external sets (18,300
    images at the embedded default's 64 px, built here: minutes on 2 cores, so under the same skip
    as PBC) to SeaweedFS S3, read back: one row per image, the ids, no error rows, finite embeddings
    of the model's width."""
    from hierdino.archs import TINY_ARCHS
    from hierdino.data import shards
    from hierdino.data.suite import EXTERNAL_SETS, build_suite

    t0 = time.perf_counter()
    suite = tmp_path / "synth-eval-default"
    build_suite(str(suite), "default", 64, seed=0, workers=2, names=EXTERNAL_SETS)
    t_build = time.perf_counter() - t0
    pbc_ids = sorted(p.relative_to(PBC).as_posix() for p in PBC.rglob("*") if p.is_file())
    sets = {d: shards.read_table(str(suite / d), columns=["image_id", "label"]) for d in EXTERNAL_SETS}
    s3_server.create_bucket("emb-real")
    out = "s3://emb-real/pbc-and-external"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address,
               AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(REPO / "jobs/embed.py"), "--model", "random:vit_tiny_cpu@64",
                        "--data", str(PBC), *(str(suite / d) for d in EXTERNAL_SETS), "--out", out,
                        "--s3-endpoint", s3_server.endpoint, "--s3-region", "us-east-1"],
                       capture_output=True, text=True, timeout=1800, env=env, cwd=tmp_path)
    t_embed = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    opts = storage.StorageOptions(**s3_server.storage_options())
    t = _table(out, opts)
    summary = json.loads(storage.read_bytes(storage.join(out, "summary.json"), opts))
    print(f"\n{len(pbc_ids):,} PBC images + {', '.join(f'{d} {len(v):,}' for d, v in sets.items())}: external sets "
          f"built in {t_build:.0f} s; jobs/embed.py {t_embed:.0f} s in all ({summary['seconds']:.0f} s embedding, "
          f"{summary['images_per_s']:.1f} images/s; the pool up after {summary['pool_up_s']:.0f} s, then "
          f"{summary['steady_images_per_s']:.1f} images/s; {summary['actors']} actor(s))")
    print([line for line in r.stdout.splitlines() if "embed: wrote" in line])

    assert t.num_rows == len(pbc_ids) + sum(len(v) for v in sets.values()) == summary["images"]
    assert t["error"].null_count == t.num_rows and summary["undecodable"] == 0
    emb = t["embedding"]
    assert emb.type.list_size == TINY_ARCHS["vit_tiny_cpu"]["embed_dim"] and emb.null_count == 0
    x = emb.combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    assert np.isfinite(x).all() and x.std() > 0
    ids, uris, labels = (np.array(t[c].to_pylist(), dtype=object) for c in ("image_id", "source_uri", "label"))
    assert len(set(ids)) == len(ids)
    in_pbc = np.array([u.startswith(f"{PBC}/") for u in uris])
    assert sorted(ids[in_pbc]) == pbc_ids and all(u == f"{PBC}/{i}" for u, i in zip(uris[in_pbc], ids[in_pbc]))
    assert all(lab is None for lab in labels[in_pbc])
    for d, want in sets.items():
        mine = np.array([u.startswith(f"{suite / d}/") for u in uris])
        got = dict(zip(ids[mine], labels[mine]))
        assert got == dict(zip(want["image_id"].to_pylist(), want["label"].to_pylist())), d
    assert in_pbc.sum() + sum(np.char.startswith(uris.astype(str), f"{suite / d}/").sum() for d in sets) == t.num_rows


def test_quiet_ray_data_hides_its_execution_lines_but_not_its_errors():
    """``jobs/embed.py`` printed Ray Data's "Progress bars disabled" warning and its "Dataset ...
    execution finished" INFO line: importing Ray Data sets its logger to INFO, after ``init_ray`` had
    lowered it. ``quiet_ray_data`` (called by ``init_ray`` after that import) keeps errors only."""
    import logging

    from ray.data._internal.logging import configure_logging

    from hierdino.runtime import quiet_ray_data

    executor = logging.getLogger("ray.data._internal.execution.streaming_executor")
    before = logging.getLogger("ray.data").level
    try:
        configure_logging()  # what ``import ray.data`` does in a fresh process
        assert executor.isEnabledFor(logging.INFO)
        quiet_ray_data(verbose=True)
        assert executor.isEnabledFor(logging.INFO)  # --verbose keeps them
        quiet_ray_data()
        assert executor.isEnabledFor(logging.ERROR) and not executor.isEnabledFor(logging.WARNING)
    finally:
        logging.getLogger("ray.data").setLevel(before)
