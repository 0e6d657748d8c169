"""Each full-size config is its anchor's recipe, as docs/recipes.md promises (issue 18).

- docs/recipes.md has a section for every full-size config (every file in configs/ outside
  configs/demo/ and _base_); the config's header names the anchor file and the published number
  the section gives, and lists deviations;
- every row of a section's "Checked settings" table equals the loaded config;
- the weight-decay rules that the recipes name (``paramwise_cfg.weight_decay_rule``) exempt exactly
  the parameters their codebases exempt, written out here per parameter name;
- the ViTDet pipeline of det_coco.yaml keeps a crop without objects, and the detector trains on it.
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from vitasks.config import load_config
from vitasks.data.det_transforms import InstanceMasks
from vitasks.engine.optimizers import LayerDecayOptimizerConstructor
from vitasks.errors import ConfigError
from vitasks.registry import MODELS, TRANSFORMS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RECIPES = ROOT / "docs" / "recipes.md"
FULL_SIZE = sorted(p.name for p in CONFIGS.glob("*.yaml"))
ABSENT = "(absent)"


# ------------------------------------------------------------------------------------ docs parser


def parse_recipes(text: str) -> dict:
    """``{config file name: {"anchor": [tokens], "published": [numbers], "deviations": bool,
    "settings": [(key, value)]}}`` from docs/recipes.md's ``### `configs/...` `` sections."""
    sections = {}
    for block in re.split(r"^### ", text, flags=re.M)[1:]:
        heading, _, body = block.partition("\n")
        names = [Path(n).name for n in re.findall(r"`([^`]+\.yaml)`", heading)]
        anchor = re.search(r"^- Anchor: (.*?)(?=^- |\n\n)", body, flags=re.M | re.S)
        published = re.search(r"^- Published: (.*?)(?=^- |\n\n)", body, flags=re.M | re.S)
        settings = []
        for line in body.splitlines():
            row = re.fullmatch(r"\| `([^`]+)` \| `(.*)` \|", line.strip())
            if row:
                settings.append((row.group(1), row.group(2)))
        entry = dict(
            anchor=re.findall(r"`([^`]+)`", anchor.group(1)) if anchor else None,
            anchor_text=anchor.group(1) if anchor else "",
            published=re.findall(r"\d+\.\d+", published.group(1)) if published else [],
            deviations=bool(re.search(r"^- (Deviations|Kept and deviations)", body, flags=re.M)),
            settings=settings,
        )
        for name in names:
            sections[name] = entry
    return sections


SECTIONS = parse_recipes(RECIPES.read_text())


def header(name: str) -> str:
    """The config's leading comment block, one line, whitespace collapsed."""
    lines = []
    for line in (CONFIGS / name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(" ".join(lines).split())


_MISSING = object()


def lookup(cfg, key: str):
    """A dotted key into the config: ``a.b``, ``a[Type]`` (first entry with that type), ``a[2]``."""
    node = cfg
    for part in key.split("."):
        m = re.fullmatch(r"([^\[\]]+)((?:\[[^\]]+\])*)", part)
        assert m, f"bad key part {part!r} in {key}"
        name, selectors = m.group(1), re.findall(r"\[([^\]]+)\]", m.group(2))
        if not hasattr(node, "keys") or name not in node:  # a dict, ConfigDict or Config
            return _MISSING
        node = node[name]
        for sel in selectors:
            if not isinstance(node, (list, tuple)):
                return _MISSING
            if re.fullmatch(r"-?\d+", sel):
                node = node[int(sel)]
            else:
                found = [e for e in node if hasattr(e, "keys") and e.get("type") == sel]
                if not found:
                    return _MISSING
                node = found[0]
    return node


def plain(value):
    """mmengine ConfigDicts / tuples as plain dicts and lists, for comparison with YAML."""
    if hasattr(value, "keys"):
        return {k: plain(value[k]) for k in value.keys()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def test_parser_reads_sections_rows_and_selectors():
    text = "### `configs/a.yaml`, `b.yaml`\n\n- Anchor: `repo` `x/y.py`.\n- Published: 1.5 AP.\n" \
           "- Deviations: none.\n\n| key | value |\n| --- | --- |\n| `p[T].q` | `[1, 2]` |\n"
    sections = parse_recipes(text)
    assert set(sections) == {"a.yaml", "b.yaml"}
    assert sections["a.yaml"]["anchor"] == ["repo", "x/y.py"] and sections["a.yaml"]["published"] == ["1.5"]
    assert sections["b.yaml"]["settings"] == [("p[T].q", "[1, 2]")]
    cfg = {"p": [{"type": "S", "q": 0}, {"type": "T", "q": [1, 2]}], "r": {"s": [5, 6]}}
    assert lookup(cfg, "p[T].q") == [1, 2] and lookup(cfg, "r.s[-1]") == 6
    assert lookup(cfg, "p[U]") is _MISSING and lookup(cfg, "r.t") is _MISSING


def test_every_full_size_config_has_a_section():
    assert "cls_imagenet.yaml" in FULL_SIZE and "det_coco.yaml" in FULL_SIZE
    missing = sorted(set(FULL_SIZE) - set(SECTIONS))
    assert not missing, f"docs/recipes.md has no section for {missing}"
    unknown = sorted(set(SECTIONS) - set(FULL_SIZE))
    assert not unknown, f"docs/recipes.md describes configs that do not exist: {unknown}"


@pytest.mark.parametrize("name", FULL_SIZE)
def test_header_names_anchor_and_published_number(name):
    section, text = SECTIONS[name], header(name)
    assert "Anchor:" in text, f"{name}: the header does not name its anchor ('Anchor: ...')"
    if section["anchor"]:
        for token in section["anchor"]:
            if token.endswith(".yaml"):  # "the recipe of X.yaml": X's own anchor is checked there
                continue
            assert token in text, f"{name}: the header does not name the anchor's {token!r}"
    else:
        assert section["anchor_text"].startswith("none") and "Anchor: none" in text, name
    for number in section["published"]:
        assert number in text, f"{name}: the header does not give the published number {number}"
    if section["deviations"]:
        assert "deviation" in text.lower(), f"{name}: docs/recipes.md lists deviations, the header none"


CHECKED = [(name, key, value) for name in FULL_SIZE for key, value in SECTIONS.get(name, {}).get("settings", [])]


def test_the_promises_cover_the_recipes_the_issue_names():
    """The settings issue 18 found drifting are among the checked rows."""
    keys = {(n, k) for n, k, _ in CHECKED}
    for name, key in [
        ("det_coco.yaml", "train_dataloader.dataset.pipeline[DetRandomCrop]"),
        ("det_coco.yaml", "optim_wrapper.paramwise_cfg"),
        ("det_coco.yaml", "model.backbone.pretrain_img_size"),
        ("seg_ade20k.yaml", "model.backbone.use_rel_pos_bias"),
        ("seg_ade20k.yaml", "model.backbone.layer_scale_init_value"),
        ("video_k400_timesformer.yaml", "model.backbone.drop_path_rate"),
        ("video_k400_timesformer.yaml", "model.data_preprocessor.mean"),
        ("video_k400_videomae.yaml", "train_cfg.max_epochs"),
        ("video_k400_videomae.yaml", "optim_wrapper.clip_grad"),
        ("video_k400_videomae.yaml", "train_dataloader.sampler"),
        ("cls_imagenet.yaml", "custom_hooks[EMAHook].decay"),
        ("cls_imagenet.yaml", "train_dataloader.dataset.pipeline[Albu].transforms[ColorJitter]"),
        ("video_k400.yaml", "optim_wrapper.optimizer"),
        ("video_k400_vivit.yaml", "optim_wrapper.optimizer"),
    ]:
        assert (name, key) in keys, (name, key)


_LOADED = {}


def loaded(name):
    if name not in _LOADED:
        _LOADED[name] = load_config(str(CONFIGS / name))
    return _LOADED[name]


@pytest.mark.parametrize("name,key,value", CHECKED, ids=[f"{n}:{k}" for n, k, _ in CHECKED])
def test_config_setting_is_what_recipes_md_promises(name, key, value):
    got = lookup(loaded(name), key)
    if value == ABSENT:
        assert got is _MISSING, f"{name}: {key} should be absent, is {got!r}"
        return
    assert got is not _MISSING, f"{name}: {key} is missing (docs/recipes.md promises {value})"
    expected = yaml.safe_load(value)
    got = plain(got)
    if isinstance(expected, float) or isinstance(got, float):
        assert got == pytest.approx(expected, rel=1e-12), (name, key)
    else:
        assert got == expected, f"{name}: {key} is {got!r}, docs/recipes.md promises {expected!r}"


# ------------------------------------------------------------------------------- weight decay


def tiny_vitdet():
    cfg = dict(
        type="MaskRCNN",
        data_preprocessor=dict(type="BaseDataPreprocessor"),
        backbone=dict(type="VisionTransformer", img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                      class_token=False, pool="none", final_norm=False, out_indices=[-1], window_size=2,
                      global_indices=[1], use_rel_pos=True, pretrain_img_size=32),
        neck=dict(type="SimpleFeaturePyramid", in_channels=32, out_channels=16),
        rpn_head=dict(type="RPNHead", in_channels=16, anchor_sizes=[8, 16, 32, 64, 128], batch_size_per_image=64,
                      pre_nms_topk=[200, 100], post_nms_topk=[100, 50]),
        roi_head=dict(type="StandardRoIHead", num_classes=3, in_channels=16, batch_size_per_image=64,
                      box_head=dict(conv_channels=16, fc_channels=32, num_convs=2),
                      mask_head=dict(conv_channels=16, num_convs=2)),
    )
    return MODELS.build(cfg)


def tiny_beit():
    return MODELS.build(dict(type="VisionTransformer", img_size=32, patch_size=16, embed_dim=32, depth=2,
                             num_heads=2, use_rel_pos_bias=True, layer_scale_init_value=1.0, pool="token"))


def decay_of(model, paramwise_cfg, wd=0.1):
    wrapper = LayerDecayOptimizerConstructor(
        dict(optimizer=dict(type="AdamW", lr=1e-3, weight_decay=wd)), paramwise_cfg)(model)
    by_param = {}
    for group in wrapper.optimizer.param_groups:
        for p in group["params"]:
            by_param[id(p)] = group["weight_decay"]
    return {name: by_param[id(p)] for name, p in model.named_parameters()}


def test_detectron2_rule_decays_biases_rel_pos_and_channel_layernorms():
    """detectron2's ViTDet: get_default_optimizer_params(weight_decay_norm=0) + {pos_embed: 0}.
    Its norm list holds torch.nn.LayerNorm (the ViT's norm1/norm2) but not detectron2's own
    channel LayerNorm (the neck's and the conv heads' "LN"), so only the ViT's LayerNorms and
    pos_embed are exempt; biases and the rel_pos tables decay."""
    model = tiny_vitdet()
    decay = decay_of(model, dict(layer_decay_rate=0.7, weight_decay_rule="detectron2", no_decay_names=["pos_embed"]))
    exempt = {n for n, wd in decay.items() if wd == 0.0}
    expected = {n for n in decay if re.fullmatch(r"backbone\.blocks\.\d+\.norm[12]\.(weight|bias)", n)}
    expected.add("backbone.pos_embed")
    assert exempt == expected
    assert decay["backbone.blocks.0.attn.qkv.bias"] == 0.1
    assert decay["backbone.blocks.1.attn.rel_pos_h"] == 0.1
    channel_ln = [n for n in decay if n.startswith(("neck.", "roi_head.")) and "norm" in n]
    assert channel_ln and all(decay[n] == 0.1 for n in channel_ln)
    # The default (timm) rule on the same model exempts every 1-D parameter and the tables.
    timm = decay_of(model, dict(layer_decay_rate=0.7))
    assert timm["backbone.blocks.0.attn.qkv.bias"] == 0.0 and timm["backbone.blocks.1.attn.rel_pos_h"] == 0.0


def test_mmseg_rule_exempts_only_1d_parameters():
    """mmseg's LayerDecayOptimizerConstructor (BEiT/MAE): `len(param.shape) == 1 or
    name.endswith('.bias') or name in ('pos_embed', 'cls_token')` with full names, which never
    equal those two: the position table, class token and relative position bias tables decay."""
    model = tiny_beit()
    decay = decay_of(model, dict(layer_decay_rate=0.65, weight_decay_rule="mmseg"), wd=0.05)
    for name, p in model.named_parameters():
        expected = 0.0 if (p.ndim == 1 or name.endswith(".bias")) else 0.05
        assert decay[name] == expected, name
    assert decay["pos_embed"] == decay["cls_token"] == 0.05
    assert any("rel_pos_bias" in n and wd == 0.05 for n, wd in decay.items())
    layer_scale = [n for n in decay if ".ls1." in n or ".ls2." in n]
    assert layer_scale and all(decay[n] == 0.0 for n in layer_scale)


def test_names_rule_exempts_only_the_named_parameters():
    model = tiny_beit()
    decay = decay_of(model, dict(weight_decay_rule="names", no_decay_names=["cls_token", "pos_embed"]), wd=1e-4)
    assert {n for n, wd in decay.items() if wd == 0.0} == {"cls_token", "pos_embed"}


def test_unknown_weight_decay_rule_is_a_config_error():
    with pytest.raises(ConfigError, match="weight_decay_rule"):
        LayerDecayOptimizerConstructor(dict(optimizer=dict(type="AdamW", lr=1e-3)), dict(weight_decay_rule="timmm"))


# ------------------------------------------------------------------------------ empty crops


def test_vitdet_pipeline_keeps_a_crop_without_objects_and_the_detector_trains_on_it():
    """det_coco.yaml's train pipeline (after loading) at 64 px: a sample whose only object lies
    outside the crop comes out packed with no instances (detectron2 keeps such crops), and Mask
    R-CNN's loss on it is finite, backpropagates, and has zero box and mask terms."""
    cfg = load_config(str(CONFIGS / "det_coco.yaml"), ["input_size=[64,64]"])
    steps = [dict(s) for s in cfg.train_dataloader.dataset.pipeline if s["type"] not in ("LoadImage", "LoadDetAnnotations")]
    # detectron2's order: RandomFlip, ResizeScale, FixedSizeCrop (its one offset draw for both
    # axes makes the order matter), then filter_empty_instances.
    assert [s["type"] for s in steps] == ["DetRandomFlip", "DetRandomResize", "DetRandomCrop",
                                          "FilterDetAnnotations", "PackDetInputs"]
    # No flip, the resize's scale drawn as 2.0 (64 x 2 = 128 px); the rest as configured.
    steps[0]["prob"] = 0.0
    steps[1]["ratio_range"] = [2.0, 2.0]
    transforms = [TRANSFORMS.build(s) for s in steps]
    # A 64 x 64 image with one small object in its top-right corner, resized to 128 x 128: the
    # 64 x 64 crop at offset round(64 u) on both axes (detectron2's FixedSizeCrop: one u for both)
    # holds the object (x >= 120, y < 8) only if 64 u > 56 and 64 u < 8 at once: never.
    def corner_object():
        masks = InstanceMasks([[[60.0, 0.0, 64.0, 0.0, 64.0, 4.0, 60.0, 4.0]]], (64, 64))
        return dict(img=np.full((64, 64, 3), 90, np.uint8), img_shape=(64, 64), ori_shape=(64, 64),
                    img_path="x.jpg", gt_bboxes=np.array([[60.0, 0.0, 64.0, 4.0]], np.float32),
                    gt_labels=np.array([1]), gt_ignore_flags=np.array([False]), gt_masks=masks,
                    rng=np.random.default_rng(0))

    results = corner_object()
    for t in transforms:
        results = t(results)
        assert results is not None, f"{type(t).__name__} dropped the sample"
    sample = results["data_samples"]
    assert tuple(results["inputs"].shape[-2:]) == (64, 64)
    assert len(sample.gt_instances.bboxes) == 0
    model = tiny_vitdet()
    inputs = results["inputs"].float().unsqueeze(0) / 255.0
    losses = model(inputs, [sample], mode="loss")
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert losses["loss_mask"].item() == 0 and all(v.item() == 0 for k, v in losses.items() if k.endswith("bbox"))
    assert losses["loss_rpn_cls"].item() > 0
    # With mmdetection's default (allow_negative_crop false) the same draw is refused.
    steps[2]["allow_negative_crop"] = False
    refuse = TRANSFORMS.build(steps[2])
    assert refuse(transforms[1](transforms[0](corner_object()))) is None


# ------------------------------------------------------------------------- pipelines run


@pytest.mark.parametrize("name", FULL_SIZE)
def test_every_pipeline_step_builds(name):
    cfg = loaded(name)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        spec = cfg.get(loader)
        pipelines = [t["dataset"]["pipeline"] for t in spec["tasks"].values()] if "tasks" in spec \
            else [spec["dataset"]["pipeline"]]
        for pipeline in pipelines:
            for step in pipeline:
                TRANSFORMS.build(dict(step))


@pytest.mark.parametrize("name", [n for n in FULL_SIZE if n.startswith("video_")])
def test_video_train_pipeline_runs_on_a_clip(name):
    """The recipe's augmentation (RandAugment, rescale/jitter, crops, colour) on a decoded clip
    gives clip_len frames of img_size, the same geometry on every frame."""
    cfg = loaded(name)
    steps = [dict(s) for s in cfg.train_dataloader.dataset.pipeline]
    assert [s["type"] for s in steps[:2]] == ["SampleFrames", "DecodeFrames"]
    transforms = [TRANSFORMS.build(s) for s in steps[2:]]
    rng = np.random.default_rng(0)
    clip = np.repeat(rng.integers(0, 256, (1, 240, 320, 3), dtype=np.uint8), cfg.clip_len, axis=0)
    results = dict(imgs=clip, img_shape=(240, 320), ori_shape=(240, 320), label=3, filename="x.mp4",
                   rng=np.random.default_rng(1))
    for t in transforms:
        results = t(results)
    inputs = results["inputs"]
    assert tuple(inputs.shape) == (3, cfg.clip_len, cfg.img_size, cfg.img_size)
    # Identical input frames stay identical: one draw per clip.
    assert torch.equal(inputs[:, 0], inputs[:, -1])


def test_deit_train_pipeline_runs_on_an_image():
    cfg = loaded("cls_imagenet.yaml")
    steps = [dict(s) for s in cfg.train_dataloader.dataset.pipeline]
    assert steps[0]["type"] == "LoadImage"
    transforms = [TRANSFORMS.build(s) for s in steps[1:]]
    results = dict(img=np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8),
                   img_shape=(300, 400), ori_shape=(300, 400), gt_label=5, img_path="x.jpg",
                   rng=np.random.default_rng(2))
    for t in transforms:
        results = t(results)
    assert tuple(results["inputs"].shape) == (3, 224, 224)


# ----------------------------------------------------------------------------- lr schedules


def simulate_lr(cfg, epoch_length: int, epochs: int) -> np.ndarray:
    """The lr of every iteration under the config's param_scheduler, stepped as mmengine's
    ParamSchedulerHook steps them (iteration-based ones after each iteration)."""
    from mmengine.registry import PARAM_SCHEDULERS

    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=float(cfg.optim_wrapper.optimizer.lr))
    schedulers = []
    for spec in cfg.param_scheduler:
        spec = dict(spec)
        cls = PARAM_SCHEDULERS.get(spec.pop("type"))
        if spec.pop("convert_to_iter_based", False):
            schedulers.append(cls.build_iter_from_epoch(optimizer, epoch_length=epoch_length, **spec))
        else:
            schedulers.append(cls(optimizer, **spec))
    per_iter = [s for s in schedulers if not s.by_epoch]
    per_epoch = [s for s in schedulers if s.by_epoch]
    lrs = []
    for i in range(epochs * epoch_length):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # (no gradient: a no-op, in the order mmengine expects)
        for s in per_iter:
            s.step()
        if (i + 1) % epoch_length == 0:
            for s in per_epoch:
                s.step()
    return np.array(lrs)


def test_videomae_schedule_is_cosine_scheduler():
    """VideoMAE's utils.cosine_scheduler(lr, min_lr, 75, n, warmup_epochs=5): np.linspace(0, lr,
    5n), then min_lr + (lr - min_lr)(1 + cos(pi i / N)) / 2 over the N = 70n other iterations."""
    cfg, n = loaded("video_k400_videomae.yaml"), 8
    lr, min_lr, warmup = 5e-4, 1e-6, 5 * n
    cosine = [min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * i / (70 * n))) for i in range(70 * n)]
    reference = np.concatenate([np.linspace(0, lr, warmup), cosine])
    ours = simulate_lr(cfg, n, 75)
    np.testing.assert_allclose(ours[warmup:], reference[warmup:], rtol=1e-9, atol=1e-15)
    # The warm-up: both linear to lr; ours from 0.001 x lr (documented), one step apart at most.
    assert np.abs(ours[:warmup] - reference[:warmup]).max() <= lr / (warmup - 1) + 1e-3 * lr + 1e-15


@pytest.mark.parametrize("name,base_lr", [("video_k400.yaml", 0.05), ("video_k400_vivit.yaml", 0.1)])
def test_vivit_schedule_is_scenics_compound(name, base_lr):
    """scenic/train_lib/lr_schedules.py, 'constant * cosine_decay * linear_warmup' with
    warmup_steps = int(2.5 n) and steps_per_cycle = 30 n: lr min(1, t / w) x cosine over the
    steps after the warm-up, (1 + cos(pi (t - w) / (30 n - w))) / 2."""
    cfg, n = loaded(name), 8
    assert cfg.optim_wrapper.optimizer.lr == base_lr
    w, total = int(2.5 * n), 30 * n
    t = np.arange(total)
    reference = base_lr * np.minimum(1.0, t / w) * 0.5 * (1 + np.cos(np.pi * np.maximum(0, t - w) / (total - w)))
    ours = simulate_lr(cfg, n, 30)
    np.testing.assert_allclose(ours[w:], reference[w:], rtol=1e-9, atol=1e-12)
    # The warm-up: ours from 0.001 x lr (documented) and mmengine's LinearLR reaches the lr one
    # iteration before Scenic's min(1, t / w): one warm-up step apart at most.
    assert np.abs(ours[:w] - reference[:w]).max() <= base_lr / (w - 1) + 1e-3 * base_lr + 1e-12


def test_deit_schedule_is_timms_per_epoch():
    """DeiT's timm CosineLRScheduler (t_initial 300, warmup_t 5 from 1e-6, lr_min 1e-5), stepped
    per epoch by main.py: lr(e) = 1e-6 + e (lr - 1e-6) / 5 for e < 5, else
    1e-5 + (lr - 1e-5)(1 + cos(pi e / 300)) / 2, constant within an epoch."""
    cfg, n = loaded("cls_imagenet.yaml"), 3
    lr = 5e-4
    epoch = np.arange(300 * n) // n
    reference = np.where(epoch < 5, 1e-6 + epoch * (lr - 1e-6) / 5,
                         1e-5 + 0.5 * (lr - 1e-5) * (1 + np.cos(np.pi * epoch / 300)))
    ours = simulate_lr(cfg, n, 300)
    assert np.abs(ours - reference).max() < 5e-4 * lr
    np.testing.assert_allclose(ours[10 * n:], reference[10 * n:], rtol=1e-3)


def test_mmengine_custom_keys_with_a_leading_dot_match_nothing():
    """Why video_k400_timesformer.yaml decays every parameter: mmaction2's TimeSformer config
    exempts '.backbone.cls_token' (etc.) through mmengine's DefaultOptimWrapperConstructor, whose
    parameter names have no leading dot, so the keys never match and the run decayed them."""
    from mmengine.optim import DefaultOptimWrapperConstructor

    class Recognizer(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Module()
            self.backbone.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.backbone.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
            self.backbone.time_embed = nn.Parameter(torch.zeros(1, 2, 4))
            self.backbone.proj = nn.Linear(4, 4)

    keys = {k: dict(decay_mult=0.0) for k in (".backbone.cls_token", ".backbone.pos_embed", ".backbone.time_embed")}
    wrapper = DefaultOptimWrapperConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.005, momentum=0.9, weight_decay=1e-4)),
        dict(custom_keys=keys))(Recognizer())
    assert all(group["weight_decay"] == 1e-4 for group in wrapper.optimizer.param_groups)
    # vitasks' config gives the same: every parameter of a tiny TimeSformer decays.
    model = MODELS.build(dict(type="VideoVisionTransformer", num_frames=2, img_size=32, patch_size=16,
                              tubelet_size=1, embed_dim=32, depth=1, num_heads=2, attention_type="divided",
                              pos_embed="learned", class_token=True, pool="token"))
    paramwise = dict(loaded("video_k400_timesformer.yaml").optim_wrapper.paramwise_cfg)
    decay = decay_of(model, paramwise, wd=1e-4)
    assert {"cls_token", "pos_embed", "time_embed"} <= set(decay) and all(wd == 1e-4 for wd in decay.values())


@pytest.mark.parametrize("name", [n for n in FULL_SIZE if n != "multitask_cls_seg.yaml"])
def test_samplers_and_hooks_build(name):
    """The recipe's sampler (RepeatAugSampler for DeiT and VideoMAE) and custom hooks (EMA) build
    from the config as written; the repeated-augmentation sampler repeats as the anchor does."""
    from vitasks.registry import DATA_SAMPLERS, HOOKS

    cfg = loaded(name)
    sampler_cfg = dict(cfg.train_dataloader.sampler)
    sampler = DATA_SAMPLERS.build(dict(sampler_cfg, dataset=list(range(1024)), seed=0))
    if sampler_cfg["type"] == "RepeatAugSampler":  # (the others may be infinite)
        indices = [int(i) for i in iter(sampler)]
        repeats = sampler_cfg["num_repeats"]
        if sampler_cfg.get("spread", True):  # DeiT's RASampler: 1024 // 256 * 256 samples, each thrice
            assert len(indices) == 1024
        else:  # VideoMAE's num_sample: every video, its repeats next to each other
            assert len(indices) == 1024 * repeats
            assert all(len(set(indices[i:i + repeats])) == 1 for i in range(0, len(indices), repeats))
    for hook in cfg.get("custom_hooks", []):
        HOOKS.build(dict(hook))
