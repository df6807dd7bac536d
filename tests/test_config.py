import pytest

from hierdino.config import Config, ConfigError, list_presets, load_config


def test_presets_load_and_round_trip(tmp_path):
    assert {"tiny-cpu", "pbc-cpu", "vits14", "vitb14", "vitl14"} <= set(list_presets())
    for name in list_presets():
        cfg = load_config(name)
        assert isinstance(cfg, Config)
        f = tmp_path / f"{name}.yaml"
        f.write_text(cfg.to_yaml())
        assert load_config(str(f)) == cfg


def test_paper_defaults_in_gpu_presets():
    s, large = load_config("vits14"), load_config("vitl14")
    assert (s.loss.dino_weight, s.loss.ibot_weight, s.loss.koleo_weight, s.loss.supervised.weight) == (0.5, 1.0, 0.0, 0.5)
    assert s.loss.supervised.alpha == 0.5 and s.optim.momentum_teacher == 0.994
    assert large.model.arch == "vit_large_patch14_dinov2" and large.model.dino_head.prototypes == 131072
    assert large.optim.layerwise_decay == 1.0 and large.model.drop_path_rate == 0.4
    assert large.loss.centering == "sinkhorn" and large.scaling.use_gpu


def test_overrides_convert_types():
    cfg = load_config("tiny-cpu", [
        "train.steps=7", "scaling.use_gpu=true", "loss.supervised.alpha=null",
        "loss.supervised.level_weights=[1, 0.5, 0.25, 0.1]", "data.train=s3://b/x,/tmp/y", "optim.base_lr=1e-3",
    ])
    assert cfg.train.steps == 7 and cfg.scaling.use_gpu is True
    assert cfg.loss.supervised.level_weights == [1.0, 0.5, 0.25, 0.1]
    assert cfg.data.train == ["s3://b/x", "/tmp/y"] and cfg.optim.base_lr == 1e-3
    assert load_config("tiny-cpu", {"train.batch_size": 64}).train.batch_size == 64


@pytest.mark.parametrize("override,message", [
    ("train.stpes=3", "unknown config key 'train.stpes'; did you mean train.steps"),
    ("trian.steps=3", "unknown config key 'trian'; did you mean train"),
    ("train.steps=abc", "train.steps: expected an integer, got 'abc'"),
    ("train.steps=0", "train.steps: 0 is out of range: must be >= 1"),
    ("loss.supervised.kind=hierarchical", "loss.supervised.kind: 'hierarchical' is not one of hxe, flat, none"),
    ("scaling.use_gpu=maybe", "scaling.use_gpu: expected true or false, got 'maybe'"),
    ("loss.supervised.level_weights=[1,1]", "level_weights"),
    ("loss", "must look like key.sub=value"),
    ("loss.supervised=3", "is a section"),
    ("data.mask_ratio=[0.6,0.2]", "data.mask_ratio"),
    ("train.batch_size=33", "not divisible"),
    ("hierarchy.name=wbc-h7", "hierarchy.name"),
    ("eval.image_size=60", "not a multiple of model.arch='vit_tiny_cpu''s patch size 8: eval.image_size=60 (e.g. 56 or 64"),
    ("scaling.gpus_per_worker=0.5", "scaling.gpus_per_worker=0.5 with scaling.num_workers=2: the workers of one run would share a GPU"),
])
def test_errors_name_key_and_value(override, message):
    extra = ["loss.supervised.alpha=null"] if "level_weights" in override else []
    if "gpus_per_worker" in override:
        extra = ["scaling.use_gpu=true", "scaling.num_workers=2"]
        load_config("tiny-cpu", ["scaling.use_gpu=true", override])  # one worker may take a fraction of a GPU
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("tiny-cpu", [override] + extra + (["scaling.num_workers=2"] if "batch_size" in override else []))


def test_both_alpha_and_level_weights_rejected():
    with pytest.raises(ConfigError, match="both set"):
        load_config("tiny-cpu", ["loss.supervised.level_weights=[1,1,1,1]"])


def test_bad_yaml_file_and_unknown_preset(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  steps: 10\n  bogus_key: 1\n")
    with pytest.raises(ConfigError, match="train.bogus_key"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="did you mean tiny-cpu"):
        load_config("tiny-cp")


def test_none_is_a_value_where_a_choice_says_so():
    assert load_config("tiny-cpu", ["loss.supervised.kind=none"]).loss.supervised.kind == "none"
    assert load_config("tiny-cpu", ["model.init_weights=none"]).model.init_weights is None


def test_inherit_reads_a_relative_parent_beside_its_file_and_an_empty_section_changes_nothing(tmp_path, monkeypatch):
    sub = tmp_path / "cfgs" / "sub"
    sub.mkdir(parents=True)
    (sub / "base.yaml").write_text("inherit: tiny-cpu\ntrain:\n  steps: 77\n")
    (sub / "child.yaml").write_text("inherit: base.yaml\nrun:\n  name: my-exp\ntrain:\n  # steps: 100\n")
    monkeypatch.chdir(tmp_path)  # not the folder of the files
    cfg = load_config("cfgs/sub/child.yaml")
    tiny = load_config("tiny-cpu")
    assert (cfg.run.name, cfg.train.steps, cfg.train.batch_size) == ("my-exp", 77, tiny.train.batch_size)
    for parent in ("child.yaml", "../sub/child.yaml"):  # the same file by another path is the same file
        (sub / "base.yaml").write_text(f"inherit: {parent}\n")
        with pytest.raises(ConfigError, match="'inherit' cycle"):
            load_config("cfgs/sub/child.yaml")


def test_eval_on_the_runs_own_sets_needs_them(tmp_path):
    """pbc-cpu scores its own data.train sets (eval.datasets: [train]): without them the run says so
    before any cluster work (the preset itself loads: runs diff their config against it)."""
    from hierdino.config import load_config
    from hierdino.data.suite import eval_set_uris
    from hierdino.eval import EvalDataError
    from hierdino.train.inputs import check_inputs

    with pytest.raises(EvalDataError, match="data.train is empty"):
        check_inputs(load_config("pbc-cpu", [f"data.synth_cache={tmp_path}"]), unbuilt_suite_ok=True)
    cfg = load_config("pbc-cpu", ["data.train=[/data/pbc,s3://b/more]", "eval.datasets=[train,synth-ext-1,/data/pbc]"])
    assert eval_set_uris(cfg)[:2] == ["/data/pbc", "s3://b/more"] and len(eval_set_uris(cfg)) == 3
    assert eval_set_uris(cfg)[2].endswith("/synth-ext-1")


def test_every_resumable_entry_names_a_key_or_section_and_training_keys_are_not_resumable():
    """A misspelt entry in ``RESUMABLE`` would silently refuse a key it meant to allow."""
    from hierdino.config.compat import RESUMABLE, resumable
    from hierdino.config.load import flat_keys

    every = list(flat_keys(Config().to_dict()))
    for entry in RESUMABLE:
        assert any(k == entry or (entry.endswith(".") and k.startswith(entry)) for k in every), entry
    assert resumable("train.steps") and resumable("eval.split") and resumable("scaling.num_workers")
    assert not any(resumable(k) for k in ("model.arch", "optim.base_lr", "loss.dino_weight", "train.seed", "data.train",
                                          "train.stop_at", "scaling"))
