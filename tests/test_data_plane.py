import dataclasses
import math

import numpy as np
import pytest
import torch

from hierdino.data import shards
from hierdino.data.augment import gaussian_blur, photometric
from hierdino.data.ingest import (
    CorruptCounter,
    CropSpec,
    IngestError,
    dataset_stream,
    describe_train_data,
    multicrop,
)
from hierdino.data.masking import block_mask, ibot_masks, max_masked_patches, padded_mask_index
from hierdino.data.shards import Record
from hierdino.data.suite import SUITE, TRAIN_SETS, plan
from hierdino.data.synth import DOMAINS, leaf_spec, render_cell
from hierdino.hierarchy import hierarchy_from_dict, load_hierarchy

H1 = load_hierarchy("wbc-h1")
CROPS = CropSpec(64, (0.32, 1.0), 2, 32, (0.05, 0.32), True, seed=3)


def _rows(ds, n=None):
    out = []
    for b in ds.iter_batches(batch_size=64, batch_format="numpy"):
        out.append(b)
    return {k: np.concatenate([b[k] for b in out]) for k in out[0]}


def _epoch(td, k, crops, epoch=0):
    """One whole epoch of dataset ``k``'s stream."""
    return _rows(dataset_stream(td.uris[k], k, td, crops, td.sizes[k], consumed=epoch * td.sizes[k], num_cpus=0.5))


def test_ingest_shapes_dtypes_labels(ray_cluster, synth_suite):
    uris = [f"{synth_suite}/{n}" for n in TRAIN_SETS]
    td = describe_train_data(uris, H1, None)
    assert td.sizes == [m.num_images for m in td.manifests.values()]
    per = [_epoch(td, k, CROPS) for k in range(3)]
    rows = {c: np.concatenate([r[c] for r in per]) for c in per[0]}
    n = sum(td.sizes)
    assert rows["global"].shape == (n, 2, 64, 64, 3) and rows["global"].dtype == np.uint8
    assert rows["local"].shape == (n, 2, 32, 32, 3) and rows["local"].dtype == np.uint8
    assert rows["sup"].shape == (n, 64, 64, 3) and rows["label"].dtype == np.int64
    assert rows["ok"].all()
    labels = rows["label"]
    assert (labels == -1).sum() == td.manifests[uris[2]].num_images  # synth-unlabeled
    assert (labels >= 0).sum() == sum(td.labeled)
    # coarse labels arrive as internal-node indices, fine labels as leaf indices
    assert (labels == H1.index("neutrophil")).any() and (labels == H1.index("neutrophil_band")).any()
    assert labels.max() < len(H1.nodes)
    assert rows["sup"][labels == -1].max() == 0 and rows["sup"][labels >= 0].max() > 0


def test_ingest_deterministic_under_seed_and_epochs_differ(ray_cluster, synth_suite):
    td = describe_train_data([f"{synth_suite}/synth-ood"], load_hierarchy("synth-ood"), None)
    crops = CropSpec(32, (0.32, 1.0), 0, 16, (0.05, 0.32), False, seed=11)
    a, b = _epoch(td, 0, crops), _epoch(td, 0, crops)
    assert np.array_equal(np.sort(a["global"].reshape(len(a["label"]), -1).sum(1)),
                          np.sort(b["global"].reshape(len(b["label"]), -1).sum(1)))
    assert "local" not in a and "sup" not in a
    e1 = _epoch(td, 0, crops, epoch=1)
    assert not np.array_equal(np.sort(a["global"].reshape(len(a["label"]), -1).sum(1)),
                              np.sort(e1["global"].reshape(len(e1["label"]), -1).sum(1)))


def test_multicrop_is_deterministic_and_flags_corrupt_bytes():
    h = load_hierarchy("wbc-h1")
    rng = np.random.default_rng(0)
    from hierdino.data.synth import encode

    good = encode(render_cell(leaf_spec(h, "monocyte"), DOMAINS["A"], 64, rng))
    batch = {"image": np.array([good, b"garbage", good], dtype=object), "image_id": np.array(["a", "b", "c"]),
             "label": np.array(["monocyte", None, "neutrophil"], dtype=object), "split": np.array(["train", "train", "val"])}
    idx = {n: h.index(n) for n in h.nodes}
    out1, out2 = multicrop(batch, CROPS, idx, epoch=0), multicrop(batch, CROPS, idx, epoch=0)
    assert out1["ok"].tolist() == [True, False]  # the val row is not a training row
    assert out1["label"].tolist() == [h.index("monocyte"), -1]
    assert np.array_equal(out1["global"], out2["global"]) and out1["global"][1].max() == 0
    assert not np.array_equal(out1["global"], multicrop(batch, CROPS, idx, epoch=1)["global"])


def test_shards_that_disagree_with_their_manifest_fail_before_the_cluster_naming_what(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    h = load_hierarchy("wbc-h1")
    recs = [Record(b"x", f"i{k}", "s", None, "monocyte", "train") for k in range(4)]
    uri = str(tmp_path / "ds")
    shards.write_dataset(recs, uri, "ds", "s")
    assert describe_train_data([uri], h, None).sizes == [4]
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps({**manifest, "num_images": 5}))
    with pytest.raises(IngestError, match=r"shards hold 4 rows but manifest.json says num_images=5"):
        describe_train_data([uri], h, None)
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps({**manifest, "shards": ["shard-00009.parquet"]}))
    with pytest.raises(IngestError, match=r"shard shard-00009.parquet listed in manifest.json cannot be read"):
        describe_train_data([uri], h, None)
    shard = tmp_path / "ds" / manifest["shards"][0]
    table = pq.read_table(shard).drop(["split"])
    pq.write_table(table.set_column(1, "image_id", pa.array(range(4))), shard)
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IngestError, match=r"bad column\(s\): image_id \(int64, expected string\), split \(missing\)"):
        describe_train_data([uri], h, None)
    batch = {"image": np.array([b"x"], dtype=object), "image_id": np.array(["cell-3"]),
             "label": np.array(["Monocyte"], dtype=object), "split": np.array(["train"])}
    with pytest.raises(IngestError, match=r"labels \['Monocyte'\] in the shard rows \(first: image 'cell-3'\)"):
        multicrop(batch, CROPS, {n: h.index(n) for n in h.nodes}, epoch=0)


def test_corrupt_images_counted_then_fail(ray_cluster, tmp_path):
    rng = np.random.default_rng(0)
    from hierdino.data.synth import encode

    recs = [Record(encode(render_cell(leaf_spec(H1, "basophil"), DOMAINS["A"], 32, rng)), f"i{i}", "t", None, None)
            for i in range(40)]
    for r in recs[:3]:
        r.image = b"\x89PNG corrupt"
    shards.write_dataset(recs, str(tmp_path / "c"), "c", "t")
    td = describe_train_data([str(tmp_path / "c")], H1, None)
    rows = _epoch(td, 0, CropSpec(32, local_number=0, supervised=False))
    assert (~rows["ok"]).sum() == 3 and rows["ok"].sum() == 37
    counter = CorruptCounter(0.1, min_seen=10)
    counter.update(rows["ok"])
    assert counter.corrupt == 3 and counter.seen == 40
    with pytest.raises(IngestError, match=r"3 of 40 images could not be decoded"):
        CorruptCounter(0.05, min_seen=10).update(rows["ok"])


def test_labels_outside_hierarchy_fail_listing_all(synth_suite):
    small = hierarchy_from_dict({"name": "small", "root": {"granulopoiesis": ["neutrophil", "basophil"]}})
    with pytest.raises(IngestError, match=r"synth-coarse: .*artefact.*eosinophil_group"):
        describe_train_data([f"{synth_suite}/synth-coarse"], small, None)


def test_weighted_mix_proportions_and_labelled_share(synth_suite):
    uris = [f"{synth_suite}/synth-fine", f"{synth_suite}/synth-unlabeled"]
    td = describe_train_data(uris, H1, [3.0, 1.0])
    assert td.proportions == pytest.approx([0.75, 0.25])
    assert td.labeled_fraction == pytest.approx(0.75)  # synth-fine is all labelled, synth-unlabeled not at all
    by_size = describe_train_data(uris, H1, None)
    assert by_size.proportions == pytest.approx([1600 / 2800, 1200 / 2800], abs=0.01)
    with pytest.raises(IngestError, match="not all 0"):
        describe_train_data(uris, H1, [0.0, 0.0])


def test_masked_patches_fit_the_buffer_the_config_sizes():
    """``max_masked_patches`` bounds every draw (8 masked crops of at most round(0.5 * 64) = 32 patches);
    the padded index lists the masked patches in ``nonzero`` order, then zeros weighed 0."""
    size = max_masked_patches(16, 8, 0.5, (0.1, 0.5))
    assert size == 8 * 32
    gen, counts = torch.Generator().manual_seed(0), set()
    for _ in range(50):
        m = ibot_masks(16, 8, 0.5, (0.1, 0.5), gen)
        index, weight = padded_mask_index(m, size)
        n = int(m.sum())
        counts.add(n)
        assert index.shape == weight.shape == (size,) and n <= size
        assert torch.equal(index[:n], m.flatten().nonzero().squeeze(1)) and (index[n:] == 0).all()
        assert weight[:n].eq(1).all() and weight[n:].eq(0).all()
    assert len(counts) > 10  # the count varies, the buffer does not
    with pytest.raises(ValueError, match="exceed the buffer"):
        padded_mask_index(torch.ones(2, 4, dtype=torch.bool), 7)


def test_ibot_masks_counts_and_ratios():
    gen = torch.Generator().manual_seed(0)
    m = ibot_masks(16, 8, 0.5, (0.1, 0.5), gen)
    assert m.shape == (16, 64) and m.dtype == torch.bool
    counts = m.sum(1)
    assert (counts > 0).sum() == 8
    ratios = counts[counts > 0].float() / 64
    assert ratios.min() >= 0.09 and ratios.max() <= 0.5
    assert ratios.max() - ratios.min() > 0.2  # spread over the range
    assert block_mask(14, 50, np.random.default_rng(0)).sum() == 50
    assert torch.equal(ibot_masks(16, 8, 0.5, (0.1, 0.5), torch.Generator().manual_seed(1)),
                       ibot_masks(16, 8, 0.5, (0.1, 0.5), torch.Generator().manual_seed(1)))


def test_photometric_shapes_determinism_and_blur():
    x = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    a = photometric(x, torch.Generator().manual_seed(0), blur_p=1.0, solarize_p=0.5)
    b = photometric(x, torch.Generator().manual_seed(0), blur_p=1.0, solarize_p=0.5)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    plain = photometric(x, torch.Generator().manual_seed(0), blur_p=0, jitter_p=0, gray_p=0, normalize=False)
    assert torch.allclose(plain, x.permute(0, 3, 1, 2).float() / 255)
    flat = torch.full((1, 3, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([1.5])), flat, atol=1e-6)
    noisy = torch.rand(2, 3, 16, 16)
    assert gaussian_blur(noisy, torch.tensor([2.0, 2.0])).std() < noisy.std() * 0.6


def test_gaussian_blur_matches_scipy_per_sample():
    """Independent reference: scipy's separable Gaussian filter with mirror borders (torch's 'reflect'),
    truncated at the same radius, one sigma per sample."""
    from scipy.ndimage import gaussian_filter1d

    x = torch.rand(3, 2, 20, 17, dtype=torch.float64)
    sigma = torch.tensor([0.4, 1.0, 2.0], dtype=torch.float64)
    got = gaussian_blur(x, sigma, max_sigma=2.0).numpy()
    radius = 6  # ceil(3 * 2.0)
    for b in range(3):
        s = float(sigma[b])
        want = gaussian_filter1d(x[b].numpy(), s, axis=-1, mode="mirror", truncate=(radius + 0.25) / s)
        want = gaussian_filter1d(want, s, axis=-2, mode="mirror", truncate=(radius + 0.25) / s)
        np.testing.assert_allclose(got[b], want, atol=1e-10)


def _pixel_features(h, leaves, n, domain, size=32, seed=0):
    rng = np.random.default_rng(seed)
    X, y = [], []
    for k, leaf in enumerate(leaves):
        for _ in range(n):
            X.append(render_cell(leaf_spec(h, leaf), DOMAINS[domain], size, rng).astype(np.float32).ravel() / 255)
            y.append(k)
    return np.array(X), np.array(y)


def test_generator_knn_on_pixels_beats_chance():
    from sklearn.neighbors import KNeighborsClassifier

    leaves = H1.leaves
    X, y = _pixel_features(H1, leaves, 12, "A")
    Xt, yt = _pixel_features(H1, leaves, 6, "A", seed=1)
    acc = KNeighborsClassifier(5).fit(X, y).score(Xt, yt)
    assert acc > 3 / len(leaves)  # chance is 1/26


def test_generator_siblings_closer_than_other_lineages():
    from sklearn.decomposition import PCA

    X, y = _pixel_features(H1, H1.leaves, 10, "A")
    Z = PCA(20, random_state=0).fit_transform(X)
    centroids = np.stack([Z[y == k].mean(0) for k in range(len(H1.leaves))])
    d = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)
    close, far = [], []
    for i, a in enumerate(H1.leaves):
        for j, b in enumerate(H1.leaves):
            if i < j:
                (close if H1.parent(a) == H1.parent(b) else far if H1.at_depth(a, 1) != H1.at_depth(b, 1) else []).append(d[i, j])
    assert np.mean(close) < 0.8 * np.mean(far)


def test_plan_is_seeded_skewed_and_covers_classes():
    spec = next(s for s in SUITE if s.name == "synth-ext-1")
    a, b = plan(spec, "small", 0), plan(spec, "small", 0)
    assert a == b and plan(spec, "small", 1) != a
    for split in ("train", "val", "test"):
        labs = [lab for s, _, lab, _ in a if s == split]
        # kNN-20 can only predict a class with >= 20 probe-training images
        assert set(labs) == set(spec.classes) and min(labs.count(c) for c in spec.classes) >= (20 if split == "train" else 10)
    counts = [lab for s, _, lab, _ in a if s == "train"]
    freqs = sorted(counts.count(c) for c in spec.classes)
    assert freqs[-1] > 4 * freqs[0]  # rare classes exist
    coarse = next(s for s in SUITE if s.name == "synth-coarse")
    labs = {lab for _, _, lab, _ in plan(coarse, "small", 0)}
    assert labs and all(not H1.is_leaf(x) for x in labs) and {"neutrophil", "lymphocyte_mature"} <= labs


def test_ingest_workers_do_not_import_torch():
    """Every Ray Data worker imports the crop UDF's module; torch there costs seconds per process."""
    import subprocess
    import sys

    code = "import sys, hierdino.data.ingest; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_a_suite_built_by_another_plan_is_not_ready(tmp_path):
    """A cached suite from an older plan (no or another suite_version) is rebuilt, not reused."""
    from hierdino.data.suite import SUITE_VERSION, suite_ready

    recs = [Record(b"x", f"i{i}", "synth-ext-1", None, None, "train") for i in range(3)]
    shards.write_dataset(recs, str(tmp_path / "synth-ext-1"), "synth-ext-1", "synth-ext-1", extra={"synthetic": True})
    assert not suite_ready(str(tmp_path), ("synth-ext-1",))
    shards.write_dataset(recs, str(tmp_path / "synth-ext-1"), "synth-ext-1", "synth-ext-1",
                         extra={"synthetic": True, "suite_version": SUITE_VERSION})
    assert suite_ready(str(tmp_path), ("synth-ext-1",)) and not suite_ready(str(tmp_path), ("synth-ext-1", "synth-ood"))


# -- where images are decoded: JPEG draft mode and the device path keep the crops' distribution -------------


def _cells(n: int, size: int, seed: int = 0) -> list[bytes]:
    from hierdino.data.synth import encode

    rng = np.random.default_rng(seed)
    leaves = ["monocyte", "neutrophil_band", "lymphocyte_typical", "eosinophil"]
    return [encode(render_cell(leaf_spec(H1, leaves[i % 4]), DOMAINS["A"], size, rng)) for i in range(n)]


def _stats(views: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-channel mean and s.d. over all pixels, and the mean absolute horizontal gradient (sharpness)."""
    x = views.reshape(-1, views.shape[-3], views.shape[-2], 3).astype(np.float64)
    return x.mean((0, 1, 2)), x.std((0, 1, 2)), float(np.abs(np.diff(x, axis=2)).mean())


def test_draft_reduction_by_hand():
    from hierdino.data.crops import View, draft_reduction

    # tightest view: 200 source px onto 64 -> 3.1 px per output px -> decode at 1/2
    assert draft_reduction([View((0, 0, 200, 210), 64), View((10, 10, 140, 150), 32)]) == 2
    assert draft_reduction([View((0, 0, 520, 520), 64)]) == 8
    assert draft_reduction([View((0, 0, 100, 100), 64)]) == 1  # 1.6 < 2: full size


def test_a_crop_box_that_finds_no_random_box_falls_back_as_torchvision_does():
    from hierdino.data.crops import crop_box

    rng = np.random.default_rng(0)
    # 3:1 and 1:3 images with the area share near 1: no box of ratio 3/4..4/3 fits in 10 tries, so the
    # largest centred box of the nearest allowed ratio (4/3 wide: round(100 * 4/3) = 133, (300 - 133) // 2 = 83)
    assert crop_box(300, 100, (0.95, 1.0), rng) == (83, 0, 216, 100)
    assert crop_box(100, 300, (0.95, 1.0), rng) == (0, 83, 100, 216)
    assert crop_box(100, 100, (1.0, 1.0), rng, ratio=(2.0, 3.0)) == (0, 25, 100, 75)  # too tall for 2:1: 100 x 50, centred


def test_jpeg_draft_decoding_keeps_the_crops_geometry_and_statistics():
    """Same images, same seeds: the views decoded at 1/2-1/8 size (DCT scaling) against full decodes."""
    from hierdino.data.crops import draft_reduction, open_image, plan_views, render_views, row_rng

    plan = dict(global_size=64, global_scale=(0.32, 1.0), local_number=4, local_size=32, local_scale=(0.05, 0.32),
                supervised=True)
    blobs = _cells(16, 320)
    reductions = [draft_reduction(plan_views(*open_image(b).size, row_rng(0, f"i{i}", 0), **plan)) for i, b in enumerate(blobs)]
    assert min(reductions) >= 2  # the test exercises reduced decodes (320 px source, 64 px views)
    full = [render_views(b, row_rng(0, f"i{i}", 0), draft=False, **plan) for i, b in enumerate(blobs)]
    fast = [render_views(b, row_rng(0, f"i{i}", 0), draft=True, **plan) for i, b in enumerate(blobs)]
    for a, b in zip(full, fast):
        for va, vb in zip(a, b):  # the same box and flips: pixel by pixel close
            assert va.shape == vb.shape and np.abs(va.astype(int) - vb.astype(int)).mean() < 2.0
    for size in (64, 32):
        sa = _stats(np.stack([v for a in full for v in a if v.shape[0] == size]))
        sb = _stats(np.stack([v for b in fast for v in b if v.shape[0] == size]))
        assert np.abs(sa[0] - sb[0]).max() < 1.0 and np.allclose(sa[1], sb[1], rtol=0.03)
        assert sb[2] == pytest.approx(sa[2], rel=0.1)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_device_decode_matches_the_cpu_crops_in_distribution(device):
    """``data.decode: device`` (torchvision decode + roi_align; nvJPEG on a GPU) against the PIL path
    on the same rows: same rows kept, same boxes and flips, close pixels and statistics."""
    from hierdino.data.device_decode import decode_views
    from hierdino.data.synth import encode

    blobs = _cells(12, 160, seed=1)
    blobs[5] = encode(render_cell(leaf_spec(H1, "basophil"), DOMAINS["B"], 160, np.random.default_rng(3)), "PNG")
    blobs[7] = b"\xff\xd8 not a jpeg"
    blobs[2], blobs[9] = _cells(1, 224, seed=5)[0], _cells(1, 96, seed=6)[0]  # sizes differ: cut per size, unpadded
    labels = ["monocyte", None, "neutrophil", None] * 3
    batch = {"image": np.array(blobs, dtype=object), "image_id": np.array([f"d{i}" for i in range(12)]),
             "label": np.array(labels, dtype=object), "split": np.array(["train"] * 12)}
    idx = {n: H1.index(n) for n in H1.nodes}
    spec = CropSpec(64, (0.32, 1.0), 3, 32, (0.05, 0.32), True, seed=4)
    cpu = multicrop(batch, spec, idx, epoch=2)
    planned = multicrop(batch, dataclasses.replace(spec, decode="device"), idx, epoch=2)
    assert "global" not in planned and planned["boxes"].shape == (12, 6, 4)
    raw = {k: v if v.dtype == object else torch.from_numpy(v) for k, v in planned.items()}
    dev = {k: v.cpu() for k, v in decode_views(raw, 64, 3, 32, torch.device(device)).items()}
    assert dev["ok"].tolist() == [i != 7 for i in range(12)] == cpu["ok"].tolist()
    assert dev["label"].tolist() == cpu["label"].tolist()
    for key, shape in (("global", (12, 2, 64, 64, 3)), ("local", (12, 3, 32, 32, 3)), ("sup", (12, 64, 64, 3))):
        d = dev[key].numpy()
        assert d.shape == shape and d.dtype == np.uint8
        assert d[7].max() == 0 and cpu[key][7].max() == 0
        ok = cpu["ok"] if key != "sup" else cpu["ok"] & (cpu["label"] >= 0)
        assert d[~ok].max() == 0 and d[ok].reshape(ok.sum(), -1).max(1).min() > 0  # unlabelled rows: no supervised view
        per_view = np.abs(d[ok].astype(int) - cpu[key][ok].astype(int)).reshape(-1, *shape[-3:]).mean((1, 2, 3))
        assert per_view.max() < 3.0, per_view  # measured <= 0.9; a wrong box or flip differs by tens of levels
        sc, sd = _stats(cpu[key][ok]), _stats(d[ok])
        assert np.abs(sc[0] - sd[0]).max() < 1.5 and np.allclose(sc[1], sd[1], rtol=0.05)
        assert sd[2] == pytest.approx(sc[2], rel=0.1)  # bilinear vs bicubic: ~5% softer


def test_per_row_blur_and_solarize_probabilities_and_the_views_layout():
    """Per-row probabilities act row by row: with p = 1 a row is blurred (solarized) exactly as by a
    call with p = 1 for all rows and the same seed, with p = 0 it is left as it was; and
    ``augment_views`` returns crop-major global crops, local crops and supervised views."""
    from hierdino.data.augment import augment_views

    x = torch.randint(0, 256, (6, 112, 112, 3), dtype=torch.uint8)  # sigma up to 1 px at this size
    plain = dict(jitter_p=0, gray_p=0, normalize=False)
    blur_p = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    sol_p = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    y = photometric(x, torch.Generator().manual_seed(3), blur_p=blur_p, solarize_p=sol_p, **plain)
    blurred = photometric(x, torch.Generator().manual_seed(3), blur_p=1.0, **plain)
    f = x.permute(0, 3, 1, 2).float() / 255
    solarized = torch.where(f >= 0.5, 1 - f, f)
    for i in range(6):
        want = blurred[i] if blur_p[i] else solarized[i] if sol_p[i] else f[i]
        assert torch.allclose(y[i], want, atol=1e-6), i
    assert all(not torch.allclose(blurred[i], f[i], atol=1e-3) for i in (0, 2, 5))  # the blur did something
    g = torch.randint(0, 256, (3, 2, 16, 16, 3), dtype=torch.uint8)
    loc = torch.randint(0, 256, (3, 4, 8, 8, 3), dtype=torch.uint8)
    glob, local, sup = augment_views(g, loc, g[:2, 0], torch.Generator().manual_seed(0))
    assert glob.shape == (6, 3, 16, 16) and local.shape == (12, 3, 8, 8) and sup.shape == (2, 3, 16, 16)
    assert augment_views(g, None, None, torch.Generator())[1:] == (None, None)


def test_the_supervised_view_keeps_its_hue_and_the_global_crops_do_not():
    """The paper's supervised view jitters brightness, contrast and saturation (0.4, 0.4, 0.2) but not
    hue; the global crops also shift hue (DINOv2's 0.1). On a uniform reddish image, the hue angle in
    the YIQ plane (atan2(Q, I), which blending with grey and scaling keep) stays put in every
    supervised view with colour left, and moves in global crops."""
    from hierdino.data.augment import IMAGENET_MEAN, IMAGENET_STD, augment_views

    n = 64
    img = torch.tensor([200, 70, 60], dtype=torch.uint8).expand(n, 2, 32, 32, 3).contiguous()
    glob, _, sup = augment_views(img, None, img[:, 0], torch.Generator().manual_seed(0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def angles(x):  # one hue angle per view (the image is uniform), for views that kept some colour
        r, g, b = (x * std + mean).mean(dim=(2, 3)).unbind(1)
        i, q = 0.596 * r - 0.274 * g - 0.322 * b, 0.211 * r - 0.523 * g + 0.312 * b
        return torch.atan2(q, i)[torch.hypot(i, q) > 0.02]

    r, g, b = (torch.tensor([200.0, 70.0, 60.0]) / 255).tolist()
    hue0 = math.atan2(0.211 * r - 0.523 * g + 0.312 * b, 0.596 * r - 0.274 * g - 0.322 * b)
    kept, shifted = angles(sup), angles(glob)
    assert len(kept) > n // 2 and torch.allclose(kept, torch.full_like(kept, hue0), atol=0.05), kept
    assert (shifted - hue0).abs().max() > 0.3, shifted  # up to 0.1 turn (0.63 rad) on the global crops


def test_center_crop_cuts_every_view_from_the_centred_box():
    """``data.center_crop``: every view of a 360 x 363 field (PBC's size) lies inside the centred box
    keeping that share of each side, the supervised view is that box, and 1.0 is the whole field."""
    from hierdino.data.crops import center_box, plan_views, row_rng

    assert center_box(360, 363, 1.0) == (0, 0, 360, 363)
    assert center_box(360, 363, 0.5) == (90, 90, 270, 272)  # 180 x 182 (181.5 rounds to even), (363 - 182) // 2 above
    plan = dict(global_size=64, global_scale=(0.4, 1.0), local_number=4, local_size=32, local_scale=(0.05, 0.3),
                supervised=True)
    lo_x, lo_y = [], []
    for i in range(200):
        views = plan_views(360, 363, row_rng(0, f"i{i}", 0), center=0.5, **plan)
        for v in views:
            left, top, right, bottom = v.box
            assert 90 <= left < right <= 270 and 90 <= top < bottom <= 272, v
            lo_x.append(left), lo_y.append(top)
        assert views[-1].box == (90, 90, 270, 272)
    assert min(lo_x) < 100 and max(lo_x) > 200  # the crops still move over the whole box
    whole = plan_views(360, 363, row_rng(0, "i0", 0), **plan)
    assert whole == plan_views(360, 363, row_rng(0, "i0", 0), center=1.0, **plan)


def test_evaluation_decodes_the_same_centre_as_the_training_views():
    """The evaluation view of an image with ``center`` equals a hand crop of its centre, resized."""
    import io

    import numpy as np
    from PIL import Image

    from hierdino.eval.decode import decode_images

    yy, xx = np.mgrid[0:120, 0:100]  # smooth, so the filter's reach past the box edge barely matters
    arr = np.stack([xx * 2.5, yy * 2.0, (xx + yy) * 1.1], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    got = decode_images([buf.getvalue()], 16, center=0.5)[0].astype(float)
    hand = np.asarray(Image.fromarray(arr[30:90, 25:75]).resize((16, 16), Image.BICUBIC)).astype(float)
    assert np.abs(got - hand).max() <= 3
    assert np.abs(decode_images([buf.getvalue()], 16)[0] - hand).mean() > 20  # the whole field differs
