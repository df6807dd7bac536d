import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hierdino import storage
from hierdino.data import shards
from hierdino.data.shards import Record, ShardError
from hierdino.storage import StorageError, StorageOptions
from hierdino.labels import LabelMapError, get_label_map


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), color, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _records(n=10):
    return [Record(_png(i * 20), f"img-{i}", "toy", f"raw{i % 2}", ["neutrophil", None][i % 2],
                   ["train", "val"][i % 2]) for i in range(n)]


def test_resolve_uris(tmp_path):
    fs, path = storage.resolve(str(tmp_path))
    assert path == str(tmp_path) and type(fs).__name__ == "LocalFileSystem"
    assert storage.resolve(f"file://{tmp_path}/x")[1] == f"{tmp_path}/x"
    fs, path = storage.resolve("s3://bucket/a/b/", StorageOptions(endpoint="http://127.0.0.1:1"))
    assert path == "bucket/a/b" and type(fs).__name__ == "S3FileSystem"
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.resolve("gs://bucket/x")
    assert "secret" not in repr(StorageOptions(access_key="AK", secret_key="secret"))


def _round_trip(uri, options=None):
    m = shards.write_dataset(_records(), uri, "toy", "toy", target_file_mb=0.0001, row_group_rows=3, options=options)
    assert m.num_images == 10 and len(m.shards) == 4  # 3+3+3+1 rows, one row group per file at this tiny target
    assert m.counts == {"train": {"neutrophil": 5}, "val": {"<unlabeled>": 5}}
    assert m.row_groups == [1, 1, 1, 1]
    one = shards.write_dataset(_records(), uri + "-one", "toy", "toy", row_group_rows=3, options=options)
    fs, root = storage.resolve(uri + "-one", options)
    with fs.open_input_file(f"{root}/{one.shards[0]}") as f:  # the manifest's count is the file's own
        assert one.row_groups == [4] == [pq.ParquetFile(f).num_row_groups]
    m2 = shards.read_manifest(uri, options)
    assert m2 == m
    table = shards.read_table(uri, options=options)
    assert table.column_names == shards.SCHEMA.names
    assert table["image_id"].to_pylist() == [f"img-{i}" for i in range(10)]
    assert table["image"].to_pylist()[3] == _records()[3].image
    val = shards.read_table(uri, columns=["image_id", "split"], split="val", options=options)
    assert val.num_rows == 5


def test_shard_round_trip_local(tmp_path):
    _round_trip(str(tmp_path / "toy"))


def test_shard_round_trip_s3(s3_server):
    s3_server.create_bucket("roundtrip")
    opts = StorageOptions(**s3_server.storage_options())
    _round_trip("s3://roundtrip/datasets/toy", opts)
    assert storage.list_files("s3://roundtrip/datasets/toy", ".parquet", opts)


def test_s3_wrong_key_and_missing_bucket(s3_server):
    s3_server.create_bucket("guarded")
    good = StorageOptions(**s3_server.storage_options())
    storage.write_bytes("s3://guarded/x.txt", b"hi", good)
    bad = StorageOptions(endpoint=s3_server.endpoint, access_key=s3_server.access_key, secret_key="wrong")
    with pytest.raises(StorageError, match="access denied") as e:
        storage.read_bytes("s3://guarded/x.txt", bad)
    assert "wrong" not in str(e.value)
    with pytest.raises(StorageError, match="bucket 'nope-bucket' does not exist"):
        storage.check_access("s3://nope-bucket/data", good)


def _class_folder(root, names_counts):
    for name, n in names_counts.items():
        d = root / name
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((6, 6, 3), 10 * i, np.uint8)).save(d / f"{i}.png")


def test_folder_adapter_maps_labels_and_rejects_unknown_before_writing(tmp_path):
    lm = get_label_map("matek_aml_2019")
    _class_folder(tmp_path / "ok", {"NGS": 2, "MYB": 1})
    items = shards.folder_items(tmp_path / "ok", lm)
    m = shards.write_items(items, str(tmp_path / "out"), "m", lm)
    assert m.counts == {"train": {"myelocyte": 1, "neutrophil_segmented": 2}}
    assert shards.read_table(str(tmp_path / "out"))["raw_label"].to_pylist().count("NGS") == 2
    _class_folder(tmp_path / "bad", {"NGS": 1, "FOO": 2, "BAR": 1})
    with pytest.raises(LabelMapError, match=r"'BAR' \(1\), 'FOO' \(2\)"):
        shards.folder_items(tmp_path / "bad", lm)


def test_unreadable_images_reported_and_skipped_only_on_request(tmp_path):
    lm = get_label_map("raabin_wbc")
    _class_folder(tmp_path / "imgs", {"Neutrophil": 2})
    (tmp_path / "imgs" / "Neutrophil" / "broken.png").write_bytes(b"not an image")
    items = shards.folder_items(tmp_path / "imgs", lm)
    with pytest.raises(ShardError, match=r"(?s)1 unreadable image.*broken\.png"):
        shards.write_items(items, str(tmp_path / "out"), "r", lm)
    assert not (tmp_path / "out" / "manifest.json").exists()
    m = shards.write_items(items, str(tmp_path / "out"), "r", lm, skip_bad=True)
    assert m.num_images == 2


def test_csv_adapter_with_splits(tmp_path):
    lm = get_label_map("bone_marrow_2021")
    _class_folder(tmp_path, {"imgs": 3})
    (tmp_path / "data.csv").write_text("path,label,split\nimgs/0.png,PLM,train\nimgs/1.png,ART,val\nimgs/2.png,MYB,test\n")
    m = shards.write_items(shards.csv_items(tmp_path / "data.csv", lm), str(tmp_path / "out"), "bm", lm)
    assert m.counts == {"train": {"plasma_cell": 1}, "val": {"<unlabeled>": 1}, "test": {"myelocyte": 1}}
    (tmp_path / "bad.csv").write_text("path,label,split\nimgs/0.png,PLM,holdout\n")
    with pytest.raises(ShardError, match=r"bad.csv:2: split 'holdout'"):
        shards.csv_items(tmp_path / "bad.csv", lm)
    (tmp_path / "bad2.csv").write_text("file,label\nimgs/0.png,PLM\n")
    with pytest.raises(ShardError, match=r"missing column\(s\) \['path'\]"):
        shards.csv_items(tmp_path / "bad2.csv", lm)


def test_make_shards_cli_synth_into_s3_and_unknown_label_fails(s3_server, tmp_path, capsys):
    import subprocess
    import sys

    from conftest import REPO

    s3_server.create_bucket("suite")
    env = dict(os.environ, AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key)
    r = subprocess.run([sys.executable, str(REPO / "jobs/make_shards.py"), "--s3-endpoint", s3_server.endpoint,
                        "synth", "--out", "s3://suite/v1", "--only", "synth-ood", "--image-size", "32",
                        "--workers", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    opts = StorageOptions(**s3_server.storage_options())
    m = shards.read_manifest("s3://suite/v1/synth-ood", opts)
    assert m.hierarchy == "synth-ood" and set(m.counts) == {"train", "val", "test"}
    _class_folder(tmp_path / "imgs", {"NGS": 1, "WHAT": 1})
    r = subprocess.run([sys.executable, str(REPO / "jobs/make_shards.py"), "folder", "--root", str(tmp_path / "imgs"),
                        "--source", "matek_aml_2019", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "'WHAT' (1)" in r.stderr and not (tmp_path / "out").exists()
