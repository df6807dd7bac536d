"""Safe by default: atomic writes, feature caches without pickle, names that cannot leave their directory."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from hierdino import storage


def _png(value: int) -> bytes:
    """An 8 x 8 grey PNG of ``value``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tiny_set(uri: str, name: str = "tiny") -> str:
    """A 2-class dataset with train and test rows (one unlabelled), written by ``write_dataset``."""
    from hierdino.data.shards import Record, write_dataset

    rows = [(lab, split) for split in ("train", "test") for lab in ("neutrophil", "monocyte")]
    records = [Record(_png(100 * (lab == "monocyte") + i), f"i{i}", "s", "a", lab, split) for i, (lab, split) in enumerate(rows)]
    records.append(Record(_png(50), "unlabelled", "s", None, None, "train"))
    write_dataset(records, uri, name, "s")
    return uri


def _files(root: Path) -> list[str]:
    """Every file under ``root``, relative to it, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- atomic writes ---------------------------------------------------------------------------------

def test_write_bytes_replaces_the_whole_file_fsyncs_it_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    target = tmp_path / "new" / "dir" / "results.json"
    storage.write_bytes(str(target), b"first version, longer than the second")
    storage.write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert _files(tmp_path) == ["new/dir/results.json"]
    assert len(synced) == 4  # each write: the file's data, then the directory's entry


def test_a_write_that_fails_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "plan.json"
    storage.write_bytes(str(target), b'{"steps": 300}')

    def refuse(src, dst):
        raise PermissionError("simulated crash at the rename")
    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="simulated crash"):
        storage.write_bytes(str(target), b'{"steps": 9')
    assert target.read_bytes() == b'{"steps": 300}'
    assert _files(tmp_path) == ["plan.json"]


def test_no_writer_in_the_package_bypasses_the_atomic_helper():
    """Results, plans, plots and markers go through ``storage.write_bytes``: no direct writes to a final path."""
    import re

    direct = re.compile(r"write_text\(|json\.dump\(|savefig\((?!buf)|open\([^)]*['\"]w")
    package = Path(storage.__file__).parent
    found = [f"{p.relative_to(package)}:{i}" for p in package.rglob("*.py") if p.name != "storage.py"
             and "testing" not in p.parts for i, line in enumerate(p.read_text().splitlines(), 1) if direct.search(line)]
    assert found == []


# -- feature caches without pickle -----------------------------------------------------------------

def test_feature_cache_holds_no_object_arrays_and_an_old_pickled_cache_is_recomputed(tmp_path, said):
    from hierdino.eval.features import dataset_features, resolve_model

    uri = _tiny_set(str(tmp_path / "set"))
    model, cache_dir = resolve_model("pixels"), str(tmp_path / "cache")
    first = dataset_features(model, uri, cache_dir, in_process=True)
    (cache,) = (tmp_path / "cache").glob("tiny-*.npz")
    with np.load(cache) as z:
        assert sorted(z.files) == ["features", "image_ids", "labels", "splits", "unlabeled"]
        assert all(z[k].dtype.kind != "O" for k in z.files)
    cached = dataset_features(model, uri, cache_dir, in_process=True)
    assert [list(getattr(cached, k)) for k in ("labels", "splits", "image_ids")] == \
        [list(getattr(first, k)) for k in ("labels", "splits", "image_ids")]
    assert None in list(cached.labels) and np.array_equal(cached.features, first.features)

    n = len(first.labels)
    pickled = {"features": np.zeros((n, 3), np.float32), "labels": np.array(["monocyte"] * n, dtype=object),
               "splits": first.splits, "image_ids": first.image_ids}  # what older versions wrote: object arrays
    for extra in ({}, {"unlabeled": np.zeros(n, bool)}):  # an old cache, and one made to look current
        buf = io.BytesIO()
        np.savez(buf, **pickled, **extra)
        cache.write_bytes(buf.getvalue())
        said.clear()
        again = dataset_features(model, uri, cache_dir, in_process=True)
        assert np.array_equal(again.features, first.features) and list(again.labels) == list(first.labels)
        assert sum("unreadable or in an old format" in line for line in said) == 1


def test_allow_pickle_appears_nowhere_in_the_package():
    package = Path(storage.__file__).parent
    assert [str(p) for p in package.rglob("*.py") if "allow_pickle" in p.read_text()] == []


# -- names that become paths -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pbc", "matek_aml-2019.v2", "r-2", "a.b"])
def test_safe_names_pass(name):
    assert storage.name_problem(name) is None


@pytest.mark.parametrize("name", ["", ".", "..", "../../x", "a/b", "a..b", "a b", "x\n", "a\\b", None])
def test_names_that_could_leave_their_directory_are_refused(name):
    assert storage.name_problem(name)


def test_a_manifest_named_out_of_its_directory_is_refused_and_nothing_is_written_outside_out(tmp_path):
    from hierdino.data.shards import ShardError
    from hierdino.eval.report import evaluate

    uri = _tiny_set(str(tmp_path / "data" / "set"))
    manifest = tmp_path / "data" / "set" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(data | {"name": "../../x"}))
    before, error = _files(tmp_path), ""
    try:
        evaluate(["pixels"], [uri], str(tmp_path / "a" / "b" / "out"), "test", probes=("knn1",), bootstrap_n=10,
                 plots=True, in_process=True)
    except ShardError as e:
        error = str(e)
    assert [f for f in _files(tmp_path) if f not in before and not f.startswith("a/b/out/")] == []
    assert f"{manifest}: dataset name '../../x' is not a safe name" in error


def test_a_run_name_with_dot_dot_is_refused_by_the_config():
    from hierdino.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"run\.name: '\.\.'"):
        load_config("tiny-cpu", ["run.name=.."])


def test_a_sweep_space_named_out_of_its_directory_is_refused(tmp_path):
    from hierdino.tune.space import SpaceError, load_space

    path = tmp_path / "space.yaml"
    path.write_text("name: ../up\nparams:\n  optim.lr: {dist: choice, values: [0.001]}\n")
    with pytest.raises(SpaceError, match=r"space\.yaml: name '\.\./up'"):
        load_space(path)


def test_reproduction_variants_are_the_designs_safe_names_and_others_are_refused(tmp_path):
    from hierdino.cli import reproduce
    from hierdino.experiments.compare import VARIANTS
    from hierdino.experiments.paired import VARIANTS as V2_VARIANTS

    assert [v for v in [*VARIANTS, *V2_VARIANTS] if storage.name_problem(v)] == []
    with pytest.raises(SystemExit) as stop:
        reproduce.main(["--variants", "../../x", "--out", str(tmp_path / "out"), "--render"])
    assert stop.value.code == 2 and not (tmp_path / "out").exists()


def test_a_dataset_whose_name_readers_would_refuse_is_not_written(tmp_path):
    """make_shards' default name is the last part of --out: a name a run would refuse fails before any shard."""
    from hierdino.data.shards import Record, ShardError, write_dataset

    with pytest.raises(ShardError, match="'my set' .* pass --name"):
        write_dataset([Record(b"x", "i0", "s", None, None)], str(tmp_path / "my set"), "my set", "s")
    assert not (tmp_path / "my set").exists()
