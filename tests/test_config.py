"""YAML configs: bases, _delete_, references, --cfg-options, safe loading, validation, dumping."""

import textwrap
from pathlib import Path

import pytest
from mmengine.config import Config

from vitasks.config import dump_config, load_config, parse_cfg_options, validate_config
from vitasks.errors import ConfigError
from vitasks.registry import MODELS


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------------------------------
# _base_ inheritance
# ------------------------------------------------------------------------------------------


def test_bases_merge_in_order_then_own_keys(tmp_path):
    write(tmp_path, "_base_/model.yaml", """
        model:
          type: M
          backbone: {type: B, depth: 12, width: 768}
          head: {type: H, loss: {type: L, weight: 1.0}}
        tags: [a, b]
    """)
    write(tmp_path, "_base_/schedule.yaml", """
        model:
          backbone: {depth: 6}
        lr: 0.1
    """)
    cfg_path = write(tmp_path, "configs/exp.yaml", """
        _base_: [../_base_/model.yaml, ../_base_/schedule.yaml]
        model:
          head:
            loss: {weight: 0.5}
        tags: [c]
        lr: 0.01
    """)
    cfg = load_config(cfg_path)
    assert isinstance(cfg, Config)
    assert cfg.filename == str(cfg_path)
    assert "_base_" not in cfg
    assert cfg.to_dict() == {
        "model": {
            "type": "M",
            # the second base overrides the first one key by key
            "backbone": {"type": "B", "depth": 6, "width": 768},
            "head": {"type": "H", "loss": {"type": "L", "weight": 0.5}},
        },
        "tags": ["c"],  # lists replace, they do not merge
        "lr": 0.01,
    }


def test_single_base_path_and_chained_bases(tmp_path):
    write(tmp_path, "a.yaml", "x: {p: 1, q: 2}\n")
    write(tmp_path, "sub/b.yaml", "_base_: ../a.yaml\nx: {q: 3}\n")
    cfg = load_config(write(tmp_path, "c.yaml", "_base_: sub/b.yaml\ny: 4\n"))
    assert cfg.to_dict() == {"x": {"p": 1, "q": 3}, "y": 4}


def test_delete_replaces_the_base_subtree(tmp_path):
    write(tmp_path, "base.yaml", """
        model:
          backbone: {type: Big, depth: 24, drop_path_rate: 0.1}
          head: {type: H}
    """)
    cfg = load_config(write(tmp_path, "exp.yaml", """
        _base_: base.yaml
        model:
          backbone:
            _delete_: true
            type: Small
            depth: 2
    """))
    assert cfg.model.backbone.to_dict() == {"type": "Small", "depth": 2}
    assert cfg.model.head.to_dict() == {"type": "H"}
    # a _delete_ without a base subtree is simply dropped
    cfg = load_config(write(tmp_path, "solo.yaml", "x: {_delete_: true, a: 1}\n"))
    assert cfg.to_dict() == {"x": {"a": 1}}


def test_missing_base_names_it_and_the_including_file(tmp_path):
    path = write(tmp_path, "exp.yaml", "_base_: [nowhere/base.yaml]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "nowhere/base.yaml" in str(err.value)
    assert "exp.yaml" in str(err.value)


def test_base_cycle_is_detected(tmp_path):
    write(tmp_path, "a.yaml", "_base_: b.yaml\n")
    write(tmp_path, "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_bad_base_value(tmp_path):
    with pytest.raises(ConfigError, match="_base_ must be a path or a list of paths"):
        load_config(write(tmp_path, "exp.yaml", "_base_: 3\n"))


def test_missing_file_and_python_config_refused(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    py = tmp_path / "exp.py"
    py.write_text("raise SystemExit('executed')\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(py)


# ------------------------------------------------------------------------------------------
# ${name} references
# ------------------------------------------------------------------------------------------


def test_references_keep_types_interpolate_and_chain(tmp_path):
    cfg = load_config(write(tmp_path, "exp.yaml", """
        data_root: data/synthetic/cls
        num_classes: 10
        img_size: [64, 48]
        train_root: ${data_root}/train
        model:
          head: {type: H, num_classes: "${num_classes}"}
          size: ${img_size}
        train_dataloader:
          dataset:
            data_root: ${data_root}
            prefix: ${train_root}/images    # a chain: train_root refers to data_root
            note: "${num_classes} classes at ${data_root}"
            literal: $${data_root}
    """))
    assert cfg.model.head.num_classes == 10
    assert isinstance(cfg.model.head.num_classes, int)
    assert list(cfg.model.size) == [64, 48]
    ds = cfg.train_dataloader.dataset
    assert ds.data_root == "data/synthetic/cls"
    assert ds.prefix == "data/synthetic/cls/train/images"
    assert ds.note == "10 classes at data/synthetic/cls"
    assert ds.literal == "${data_root}"


def test_cfg_options_retarget_every_reference(tmp_path):
    path = write(tmp_path, "exp.yaml", """
        data_root: data/synthetic/cls
        num_classes: 4
        model:
          head: {num_classes: "${num_classes}"}
        train_dataloader: {dataset: {data_root: "${data_root}", ann: "${data_root}/train.txt"}}
        val_evaluator: {topk: ["${num_classes}"]}
    """)
    cfg = load_config(path, ["data_root=/datasets/pets", "num_classes=37"])
    assert cfg.model.head.num_classes == 37
    assert cfg.train_dataloader.dataset.data_root == "/datasets/pets"
    assert cfg.train_dataloader.dataset.ann == "/datasets/pets/train.txt"
    assert list(cfg.val_evaluator.topk) == [37]


def test_unknown_reference_names_the_key_path(tmp_path):
    path = write(tmp_path, "exp.yaml", """
        data_root: d
        model:
          backbone: {pretrained: "${data_rot}/vit.pth"}
    """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "model.backbone.pretrained" in msg
    assert "data_rot" in msg and "did you mean: data_root" in msg


def test_reference_cycle(tmp_path):
    with pytest.raises(ConfigError, match="cycle"):
        load_config(write(tmp_path, "exp.yaml", "a: ${b}\nb: ${a}\n"))


def test_unset_data_root_asks_for_cfg_options(tmp_path):
    path = write(tmp_path, "exp.yaml", """
        data_root: null
        train_dataloader: {dataset: {data_root: "${data_root}"}}
    """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train_dataloader.dataset.data_root" in str(err.value)
    assert "--cfg-options data_root=" in str(err.value)
    # given on the command line, the same config loads
    assert load_config(path, ["data_root=/x"]).train_dataloader.dataset.data_root == "/x"
    with pytest.raises(ConfigError, match="--cfg-options data_root="):
        load_config(write(tmp_path, "e2.yaml", "data_root: ''\nval: ${data_root}/val\n"))


def test_retarget_option_that_nothing_reads(tmp_path):
    """`num_classes=K` on a config with one class count per task is an error naming those keys;
    on a config with no classes at all it is ignored with a warning."""
    per_task = write(tmp_path, "mt.yaml", """
        data_root: data
        cls_classes: 10
        det_classes: 4
        model: {tasks: {cls: {num_classes: "${cls_classes}"}, det: {num_classes: "${det_classes}"}}}
        train_dataloader: {dataset: {data_root: "${data_root}/cls"}}
    """)
    with pytest.raises(ConfigError, match=r"num_classes.*set cls_classes, det_classes"):
        load_config(per_task, ["data_root=/x", "num_classes=3"])
    assert load_config(per_task, ["data_root=/x"]).train_dataloader.dataset.data_root == "/x/cls"
    no_classes = write(tmp_path, "depth.yaml", """
        data_root: data
        val: ${data_root}/val
    """)
    with pytest.warns(UserWarning, match="num_classes is ignored"):
        assert load_config(no_classes, ["data_root=/x", "num_classes=3"]).val == "/x/val"


def test_mapping_cannot_be_interpolated(tmp_path):
    with pytest.raises(ConfigError, match="cannot be interpolated"):
        load_config(write(tmp_path, "exp.yaml", "m: {a: 1}\ns: x${m}\n"))


# ------------------------------------------------------------------------------------------
# --cfg-options
# ------------------------------------------------------------------------------------------


def test_parse_cfg_options_yaml_types():
    parsed = parse_cfg_options([
        "a=[1, 2]", "b=true", "c=1e-4", "d=hello world", "e.f=3", "g=", "h={x: 1}",
        "i=yes", "j=0.5", "k=a=b",
    ])
    assert parsed == {"a": [1, 2], "b": True, "c": 1e-4, "d": "hello world", "e.f": 3,
                      "g": None, "h": {"x": 1}, "i": "yes", "j": 0.5, "k": "a=b"}
    assert isinstance(parsed["c"], float)


@pytest.mark.parametrize("bad", ["noequals", "=1", "a..b=1", ".a=1", "a=[1, 2"])
def test_malformed_cfg_options(bad):
    with pytest.raises(ConfigError, match="cfg-options"):
        parse_cfg_options([bad])


def test_cfg_options_dotted_keys_and_list_indices(tmp_path):
    path = write(tmp_path, "exp.yaml", """
        lr: 0.1
        train_dataloader:
          batch_size: 8
          dataset:
            pipeline:
              - {type: LoadImage}
              - {type: Flip, p: 0.5}
        model: {head: {type: H, loss: {type: L, w: 1}}, neck: null}
    """)
    cfg = load_config(path, [
        "train_dataloader.dataset.pipeline.1.p=0.3",
        "train_dataloader.batch_size=2",
        "lr=1e-4",
        "model.head.loss={w: 2}",       # a mapping merges into the existing one
        "model.neck.type=N",            # a null section is created
        "new.key=[1, 2]",
        "train_dataloader.dataset.pipeline.-1.q=true",
    ])
    assert cfg.train_dataloader.dataset.pipeline[1].to_dict() == {"type": "Flip", "p": 0.3,
                                                                  "q": True}
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.lr == pytest.approx(1e-4) and isinstance(cfg.lr, float)
    assert cfg.model.head.loss.to_dict() == {"type": "L", "w": 2}
    assert cfg.model.neck.to_dict() == {"type": "N"}
    assert list(cfg.new.key) == [1, 2]
    # a dict of already-typed values works too
    assert load_config(path, {"train_dataloader.batch_size": 5}).train_dataloader.batch_size == 5


@pytest.mark.parametrize("option, message", [
    ("train_dataloader.dataset.pipeline.5.p=1", "out of range"),
    ("train_dataloader.dataset.pipeline.x.p=1", "not an index"),
    ("lr.x=1", "not a mapping"),
])
def test_cfg_options_that_do_not_fit(tmp_path, option, message):
    path = write(tmp_path, "exp.yaml", """
        lr: 0.1
        train_dataloader: {dataset: {pipeline: [{type: A}]}}
    """)
    with pytest.raises(ConfigError, match=message):
        load_config(path, [option])


# ------------------------------------------------------------------------------------------
# Safe YAML
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", [
    "model: !!python/object/apply:os.system ['touch {marker}']\n",
    "model: !!python/object/apply:builtins.open ['{marker}', 'w']\n",
    "model:\n  x: !!python/object/new:subprocess.Popen [['touch', '{marker}']]\n",
    "model: !!python/name:os.system\n",
])
def test_python_tags_are_refused_and_nothing_runs(tmp_path, template):
    marker = tmp_path / "pwned"
    path = write(tmp_path, "evil.yaml", "a: 1\n" + template.format(marker=marker))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "evil.yaml" in msg
    assert "line " in msg
    assert "python" in msg
    assert not marker.exists()


def test_python_tag_in_a_base_or_an_option_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    write(tmp_path, "base.yaml", f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="base.yaml, line 1"):
        load_config(write(tmp_path, "exp.yaml", "_base_: base.yaml\n"))
    path = write(tmp_path, "ok.yaml", "x: 1\n")
    with pytest.raises(ConfigError, match="python"):
        load_config(path, [f"x=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


def test_yaml12_floats_and_booleans(tmp_path):
    cfg = load_config(write(tmp_path, "exp.yaml", """
        lr: 1e-4
        wd: 5E-2
        big: 1.0e5
        plain: 3
        on_str: on
        yes_str: yes
        flag: true
    """))
    assert cfg.lr == pytest.approx(1e-4) and isinstance(cfg.lr, float)
    assert cfg.wd == pytest.approx(0.05)
    assert cfg.big == 1e5
    assert cfg.plain == 3 and isinstance(cfg.plain, int)
    assert cfg.on_str == "on" and cfg.yes_str == "yes"
    assert cfg.flag is True


def test_invalid_yaml_and_duplicate_keys_name_the_line(tmp_path):
    # the error is found at the end of the file; the message also points at the open "["
    message = r"bad.yaml, line 3: invalid YAML: .*flow sequence started at line 2"
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "bad.yaml", "a: 1\nb: [1, 2\n"))
    with pytest.raises(ConfigError, match=r"dup.yaml, line 3: .*duplicate key 'lr'"):
        load_config(write(tmp_path, "dup.yaml", "lr: 1\nx: 2\nlr: 3\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "list.yaml", "- a\n- b\n"))


# ------------------------------------------------------------------------------------------
# dump
# ------------------------------------------------------------------------------------------


def test_dump_round_trip(tmp_path):
    path = write(tmp_path, "exp.yaml", """
        data_root: d
        num_classes: 3
        lr: 1e-10
        model: {head: {num_classes: "${num_classes}"}, size: [224, 224]}
        literal: $${data_root}
        nothing: null
    """)
    cfg = load_config(path)
    cfg.model.tup = (1, 2)
    out = tmp_path / "work" / "dumped.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    expected = cfg.to_dict()
    expected["model"]["tup"] = [1, 2]
    assert again.to_dict() == expected
    assert again.literal == "${data_root}"


def test_dump_refuses_objects(tmp_path):
    with pytest.raises(ConfigError, match="model.fn"):
        dump_config({"model": {"fn": object()}}, tmp_path / "x.yaml")


# ------------------------------------------------------------------------------------------
# validate_config
# ------------------------------------------------------------------------------------------


class CfgTestNet:
    """A tiny component with explicit arguments, registered only during these tests."""

    def __init__(self, depth: int, width: int = 4, *, init_cfg=None):
        self.depth, self.width = depth, width


class CfgTestLoose:
    def __init__(self, depth: int = 1, **kwargs):
        pass


class CfgTestWrapper:
    # names under `ops` are classes of the `collections` module, not registered components
    config_foreign_types = {"ops": "collections"}

    def __init__(self, ops=()):
        pass


@pytest.fixture
def test_components():
    MODELS.register_module(module=CfgTestNet)
    MODELS.register_module(module=CfgTestLoose)
    MODELS.register_module(module=CfgTestWrapper)
    yield
    for name in ("CfgTestNet", "CfgTestLoose", "CfgTestWrapper"):
        MODELS._module_dict.pop(name, None)


def make(tmp_path, text):
    return load_config(write(tmp_path, "exp.yaml", text))


def test_valid_config_passes(tmp_path, test_components):
    cfg = make(tmp_path, """
        default_scope: vitasks
        model:
          type: CfgTestNet
          depth: 2
          width: 8
          init_cfg: [{type: TruncNormal, layer: Linear, std: 0.02}]
        other: {type: CfgTestLoose, anything: 1}
        train_dataloader: {sampler: {type: DefaultSampler, shuffle: true},
                           collate_fn: {type: pseudo_collate}}
        optim_wrapper: {type: AmpOptimWrapper, optimizer: {type: AdamW, lr: 1e-3}}
        param_scheduler: [{type: CosineAnnealingLR, by_epoch: true}]
        default_hooks: {checkpoint: {type: CheckpointHook, interval: 1}}
        wrapped: {type: CfgTestWrapper, ops: [{type: OrderedDict}, {type: Counter}]}
    """)
    validate_config(cfg)  # no error


def test_misspelt_type_suggests_nearest_names(tmp_path, test_components):
    cfg = make(tmp_path, "model: {type: ImageClassifier, backbone: {type: CfgTstNet, depth: 2}}\n")
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    msg = str(err.value)
    assert "exp.yaml" in msg
    assert "model.backbone.type: 'CfgTstNet' is not registered in vitasks" in msg
    assert "did you mean: CfgTestNet" in msg


def test_misspelt_mmengine_type_and_hopeless_name(tmp_path):
    cfg = make(tmp_path, """
        optim_wrapper: {optimizer: {type: AdamWW}}
        model: {type: Qqqqqqqqqqqq}
    """)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    msg = str(err.value)
    assert "2 problems" in msg
    assert "optim_wrapper.optimizer.type: 'AdamWW'" in msg and "AdamW" in msg
    assert "model.type: 'Qqqqqqqqqqqq' is not registered" in msg and "vitasks list" in msg


def test_unknown_argument_lists_accepted_ones(tmp_path, test_components):
    cfg = make(tmp_path, "model: {backbone: {type: CfgTestNet, depth: 2, widht: 3}}\n")
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    msg = str(err.value)
    assert "model.backbone.widht" in msg
    assert "CfgTestNet has no argument 'widht'" in msg
    assert "did you mean: width" in msg
    assert "accepted arguments: depth, width, init_cfg" in msg


def test_foreign_type_names_are_checked_in_their_module(tmp_path, test_components):
    cfg = make(tmp_path, "w: {type: CfgTestWrapper, ops: [{type: Countr}]}\n")
    with pytest.raises(ConfigError, match=r"w.ops.0.type: 'Countr' is not a transform in "
                                          r"collections; did you mean: Counter"):
        validate_config(cfg)


def test_albumentations_inside_albu(tmp_path):
    from vitasks.plugins import register_all_modules
    from vitasks.registry import TRANSFORMS

    register_all_modules()
    assert "Albu" in TRANSFORMS.module_dict  # vitasks.data.transforms registers it
    cfg = make(tmp_path, """
        pipeline:
          - type: Albu
            transforms:
              - {type: HorizontalFlip, p: 0.5}
              - {type: HorizontalFlp}
              - {type: RandomResizedCrop, height: 32}
    """)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    msg = str(err.value)
    assert "pipeline.0.transforms.1.type: 'HorizontalFlp'" in msg and "HorizontalFlip" in msg
    assert "pipeline.0.transforms.2.height" in msg and "size" in msg


def test_validation_imports_listed_plugins(tmp_path):
    write(tmp_path, "cfg_test_plugin_mod.py", """
        from vitasks.registry import MODELS

        @MODELS.register_module()
        class CfgPluginThing:
            def __init__(self, k: int = 1):
                pass
    """)
    cfg = make(tmp_path, "plugins: [cfg_test_plugin_mod.py]\nmodel: {type: CfgPluginThing, k: 2}\n")
    try:
        validate_config(cfg)
        assert "CfgPluginThing" in MODELS.module_dict
    finally:
        import sys

        MODELS._module_dict.pop("CfgPluginThing", None)
        sys.modules.pop("cfg_test_plugin_mod", None)


def test_config_text_is_not_run_through_yapf(monkeypatch):
    """mmengine logs the config's text and puts it in every checkpoint; formatted by yapf that
    takes seconds for a multi-task config, so a loaded config's text skips the formatter."""
    import mmengine.config.config as mmengine_config

    def no_formatter(*args, **kwargs):
        raise AssertionError("yapf ran")

    monkeypatch.setattr(mmengine_config, "FormatCode", no_formatter)
    cfg = load_config(Path(__file__).parents[1] / "configs" / "demo" / "multitask_synthetic.yaml")
    text = cfg.pretty_text
    assert "MultiTaskModel" in text and "cls_data_root" in text
