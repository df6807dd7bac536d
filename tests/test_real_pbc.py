"""Real cells: a 200-image slice of the shared PBC set (Acevedo et al. 2020, CC BY 4.0) in its published
layout -> make_shards pbc with split fractions -> a few steps of the pbc-cpu preset -> the evaluation
of its val split. The images live outside the repository (``../shared/data/real-wbc/pbc``, or
``$HIERDINO_PBC_ROOT``); without them the test says why it skips."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PBC = Path(os.environ.get("HIERDINO_PBC_ROOT", REPO.parent / "shared/data/real-wbc/pbc/PBC_dataset_normal_DIB"))
# PROVENANCE.md's table: file-name prefix -> the deepest wbc-h2 node it names
PREFIX_NODE = {"BA": "basophil", "EO": "eosinophil", "ERB": "erythroblast", "LY": "lymphocyte_typical",
               "MO": "monocyte", "BNE": "neutrophil_band", "SNE": "neutrophil_segmented", "NEUTROPHIL": "neutrophil",
               "MMY": "metamyelocyte", "MY": "myelocyte", "PMY": "promyelocyte",
               "IG": "granulocytic_normal_immature", "PLATELET": "platelet"}


def _slice(dst: Path, per_prefix: int = 16) -> int:
    """The first ``per_prefix`` images of each prefix (sorted names), linked in the published layout."""
    n = 0
    for folder in sorted(p for p in PBC.iterdir() if p.is_dir()):
        taken = collections.Counter()
        for img in sorted(folder.glob("*.jpg")):
            prefix = img.name.split("_")[0]
            if taken[prefix] < per_prefix:
                (dst / folder.name).mkdir(parents=True, exist_ok=True)
                (dst / folder.name / img.name).symlink_to(img)
                taken[prefix] += 1
                n += 1
    return n


@pytest.mark.skipif(not PBC.is_dir(), reason=f"the shared PBC images are not at {PBC} (set HIERDINO_PBC_ROOT)")
def test_pbc_slice_makes_shards_trains_pbc_cpu_and_evaluates(ray_cluster, tmp_path):
    from hierdino.data import shards

    root = tmp_path / "PBC_dataset_normal_DIB"
    n = _slice(root)
    assert n == 13 * 16  # 13 prefixes, 16 each: a 208-image slice
    out = tmp_path / "pbc"
    r = subprocess.run([sys.executable, str(REPO / "jobs/make_shards.py"), "pbc", "--root", str(root), "--out", str(out),
                        "--split-fractions", "0.6,0.2,0.2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = shards.read_table(str(out), columns=["image_id", "label", "split"]).to_pylist()
    assert len(rows) == n
    for row in rows:  # every label from its file name's prefix, checked against PROVENANCE's table
        assert row["label"] == PREFIX_NODE[Path(row["image_id"]).name.split("_")[0]], row
    splits = collections.Counter(row["split"] for row in rows)
    assert set(splits) == {"train", "val", "test"} and splits["train"] > splits["val"] > 0, splits

    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    r = subprocess.run([sys.executable, str(REPO / "jobs/pretrain.py"), "--config", "pbc-cpu",
                        "--set", f"data.train=[{out}]", "--set", f"run.storage={tmp_path}/runs", "--set", "train.steps=6",
                        "--set", "train.log_every=3", "--set", "train.batch_size=16", "--set", "scaling.cpus_per_worker=0.5",
                        "--set", "eval.bootstrap=50"],
                       capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 6/6 | loss" in r.stdout and f"evaluating {tmp_path}/runs/pbc-cpu on {out} (val split)" in r.stdout
    res = json.loads((tmp_path / "runs" / "pbc-cpu" / "eval" / "results.json").read_text())
    assert {row["dataset"] for row in res["rows"]} == {"pbc"} and res["split"] == "val"
    assert all(row["n"] == sum(res["datasets"]["pbc"]["counts"]["val"].values()) for row in res["rows"])
    info = json.loads((tmp_path / "runs" / "pbc-cpu" / "export" / "model.json").read_text())
    assert info["center_crop"] == 0.5 and info["img_size"] == 64  # the geometry evaluation and later users need
