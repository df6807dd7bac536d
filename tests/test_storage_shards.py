import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hierdino import storage
from hierdino.data import shards
from hierdino.data.shards import Record, ShardError
from hierdino.labels import LabelMapError, get_label_map
from hierdino.storage import StorageError, StorageOptions


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
    # a failed rewrite leaves the dataset it would replace whole; a good one replaces it and its files
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(ShardError, match="1 unreadable image"):
        shards.write_items(items, str(tmp_path / "out"), "r", lm)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert shards.read_table(str(tmp_path / "out")).num_rows == 2
    m2 = shards.write_items(items[:1], str(tmp_path / "out"), "r", lm)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["manifest.json", *m2.shards])
    assert m2.shards != m.shards and shards.read_table(str(tmp_path / "out")).num_rows == 1


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


def test_folder_adapter_reads_split_folders_patient_folders_and_symlinks_and_lists_what_it_skips(tmp_path, capsys):
    lm = get_label_map("matek_aml_2019")
    root = tmp_path / "matek"
    _class_folder(root / "train", {"NGS": 2})
    _class_folder(root / "test", {"NGS": 1, "MYB/patient_7": 2})  # images one folder deeper: still MYB
    _class_folder(tmp_path / "elsewhere", {"MON": 3})
    (root / "train" / "MON").symlink_to(tmp_path / "elsewhere" / "MON", target_is_directory=True)
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(root / "train" / "NGS" / "x.webp")
    (root / "train" / "NGS" / "notes.txt").write_text("not an image")
    (root / "train" / "NGS" / "._0.png").write_bytes(b"macOS metadata")
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(root / "train" / "stray.png")
    items = shards.folder_items(root, lm)
    by_split = {}
    for item in items:
        by_split.setdefault(item.split, []).append((item.raw_label, item.label))
    assert sorted(by_split["train"]) == [("MON", "monocyte")] * 3 + [("NGS", "neutrophil_segmented")] * 3
    assert sorted(by_split["test"]) == [("MYB", "myelocyte")] * 2 + [("NGS", "neutrophil_segmented")]
    out = capsys.readouterr().out
    assert "1 .txt files" in out and "1 hidden" in out and "1 images directly in" in out
    with pytest.raises(ShardError, match="drop --split test"):
        shards.folder_items(root, lm, split="test")
    _class_folder(tmp_path / "mixed", {"train/NGS": 1, "MYB": 1})
    with pytest.raises(ShardError, match=r"mixes split folders \['train'\] with other folders \['MYB'\]"):
        shards.folder_items(tmp_path / "mixed", lm)
    m = shards.write_items(items, str(tmp_path / "out"), "m", lm)
    assert m.counts["test"] == {"myelocyte": 2, "neutrophil_segmented": 1} and m.num_images == 9


def test_sixteen_bit_tiff_and_bmp_images_keep_their_grey_levels_on_every_path(tmp_path):
    import torch

    from hierdino.data import crops, device_decode

    grey16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64 + 7)  # 7 .. 65479
    expected = (grey16 >> 8).astype(np.uint8)  # the top byte, by hand
    Image.fromarray(grey16).save(tmp_path / "g.png")
    Image.fromarray(grey16).save(tmp_path / "g.tif")
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    for name, want in (("g.png", np.repeat(expected[..., None], 3, 2)), ("g.tif", np.repeat(expected[..., None], 3, 2)),
                       ("c.bmp", rgb)):
        data = (tmp_path / name).read_bytes()
        assert np.array_equal(np.asarray(crops.decode(data)), want), name  # the CPU decode
        stored = shards._check_image(tmp_path / name)  # what make_shards writes
        assert stored[:4] == b"\x89PNG" and np.array_equal(np.asarray(crops.decode(stored)), want), name
        images, ok = device_decode.decode_batch([data], torch.device("cpu"))  # data.decode: device's host fallback
        assert ok.all() and np.array_equal(images[0].permute(1, 2, 0).numpy(), want), name


def test_csv_rows_that_are_short_long_or_pathless_are_named_and_an_excel_bom_is_read(tmp_path):
    lm = get_label_map("bone_marrow_2021")
    _class_folder(tmp_path, {"imgs": 2})
    (tmp_path / "excel.csv").write_bytes("\ufeffpath,label\n imgs/0.png ,PLM\nimgs/1.png,\n".encode())
    items = shards.csv_items(tmp_path / "excel.csv", lm)
    assert [(it.image.name, it.raw_label, it.label) for it in items] == [("0.png", "PLM", "plasma_cell"), ("1.png", None, None)]
    for body, match in (("imgs/0.png\n", r"short.csv:2: too few fields"),
                        ("imgs/0.png,PLM,train,extra\n", r"short.csv:2: 1 more field"),
                        (",PLM\n", r"short.csv:2: empty path")):
        (tmp_path / "short.csv").write_text("path,label" + (",split" if "train" in body else "") + "\n" + body)
        with pytest.raises(ShardError, match=match):
            shards.csv_items(tmp_path / "short.csv", lm)


def test_a_bad_manifest_is_named_with_what_is_wrong(tmp_path):
    shards.write_dataset(_records(4), str(tmp_path / "ds"), "ds", "toy")
    path = tmp_path / "ds" / "manifest.json"
    good = path.read_text()
    for text, match in (("{not json", r"manifest.json is not valid JSON"),
                        (good.replace('"counts"', '"kounts"'), r"missing key\(s\) \['counts'\]; unknown key\(s\) \['kounts'\]"),
                        ("[1, 2]", r"expected a JSON object")):
        path.write_text(text)
        with pytest.raises(ShardError, match=match):
            shards.read_manifest(str(tmp_path / "ds"))


def test_label_map_keys_that_yaml_turns_into_numbers_or_booleans_are_refused(tmp_path):
    (tmp_path / "maps.yaml").write_text("lab:\n  01: lymphocyte\n  no: monocyte\n  unlabeled: ART\n")
    with pytest.raises(LabelMapError, match=r"YAML read 1: 'lymphocyte', False: 'monocyte'; quote them"):
        get_label_map("lab", path=tmp_path / "maps.yaml")
    (tmp_path / "maps.yaml").write_text("lab:\n  '01': lymphocyte\n  unlabeled: ART\n")
    lm = get_label_map("lab", path=tmp_path / "maps.yaml")
    assert lm.map(["01", "ART"]) == ["lymphocyte", None] and lm.unlabeled == frozenset({"ART"})
