"""The demo trade-off's pieces (vitasks/benchmarks/token_tradeoff.py): agreement of two prediction dumps
against a direct count, interleaved timing order, the variants the table runs (their configs
carry the token option and nothing else), and ToMe applied to the plain demo's weights: r=0 is
the plain model bit for bit, r>0 changes the tokens but not the output's shape."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitasks.apis import init_model, load_cfg
from vitasks.errors import ConfigError
from vitasks.models.layers.token_reduction import count_tokens
from vitasks.benchmarks.token_tradeoff import (
    cls_agreement,
    demo_variants,
    format_tradeoff,
    interleaved_times,
    seg_agreement,
)


def write_cls_dump(path, preds):
    with open(path, "w") as f:
        for name, pred in preds.items():
            f.write(json.dumps({"file": name, "pred": pred, "scores": [0.0]}) + "\n")


def test_cls_agreement_counts_same_top1_by_file(tmp_path):
    ref = {"a/1.png": 0, "a/2.png": 3, "b/3.png": 1, "b/4.png": 2}
    other = {"b/4.png": 2, "a/1.png": 1, "b/3.png": 1, "a/2.png": 3}  # other order; 3 of 4 agree
    write_cls_dump(tmp_path / "ref.jsonl", ref)
    write_cls_dump(tmp_path / "other.jsonl", other)
    assert cls_agreement(str(tmp_path / "ref.jsonl"), str(tmp_path / "other.jsonl")) == pytest.approx(75.0)
    write_cls_dump(tmp_path / "fewer.jsonl", {"a/1.png": 0})
    with pytest.raises(ConfigError, match="different images"):
        cls_agreement(str(tmp_path / "ref.jsonl"), str(tmp_path / "fewer.jsonl"))


def test_seg_agreement_counts_equal_pixels_over_all_maps(tmp_path):
    rng = np.random.default_rng(0)
    maps = {"x.png": (4, 5), "sub/y.png": (3, 3)}
    same = total = 0
    for name, shape in maps.items():
        a = rng.integers(0, 4, shape, dtype=np.uint8)
        b = np.where(rng.random(shape) < 0.3, (a + 1) % 4, a).astype(np.uint8)
        same, total = same + int((a == b).sum()), total + a.size
        for folder, m in (("ref", a), ("other", b)):
            (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(tmp_path / folder / name)
    got = seg_agreement(str(tmp_path / "ref"), str(tmp_path / "other"))
    assert got == pytest.approx(100.0 * same / total)
    assert seg_agreement(str(tmp_path / "ref"), str(tmp_path / "ref")) == 100.0


def test_interleaved_times_runs_round_robin():
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, iters=2, warmup=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3  # warm-up, then rounds over the variants
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6}


@pytest.mark.parametrize("kind", ["cls", "seg"])
def test_demo_variants_differ_from_the_plain_demo_only_in_the_token_option(kind):
    variants = demo_variants(kind, tome_r=[2, 12])
    assert [v.name for v in variants][:3] == ["plain", "TokenLearner", "visual tokens"]
    plain = load_cfg(variants[0].config).to_dict()
    tome_r = []
    for v in variants[1:]:
        cfg = load_cfg(v.config, v.options).to_dict()
        reduction = cfg["model"]["backbone"].pop("token_reduction")
        assert cfg == plain, f"{v.config} changes more than model.backbone.token_reduction"
        if v.name.startswith("ToMe"):
            assert not v.trained and v.weights_of == "plain" and reduction["type"] == "ToMe"
            tome_r.append(reduction["r"])
        else:
            assert v.trained
    assert tome_r == [2, 12]
    with pytest.raises(ConfigError, match="demo kind"):
        demo_variants("det", [2])


@torch.no_grad()
def test_tome_on_the_plain_demo_weights():
    """ToMe needs no training: the plain demo's weights load into the ToMe demo; r=0 reproduces
    the plain logits bit for bit (100 % agreement), r=8 merges 8 tokens per block."""
    plain = init_model("configs/demo/cls_synthetic.yaml")
    weights = plain.state_dict()
    x = torch.randn(4, 3, 64, 64)
    expected = plain(x, mode="tensor")
    for r, tokens in ((0, [65, 65, 65, 65]), (8, [65, 57, 49, 41])):
        tome = init_model("configs/demo/cls_synthetic_tome.yaml", cfg_options=[f"model.backbone.token_reduction.r={r}"])
        tome.load_state_dict(weights)
        assert count_tokens(tome, x[:1]) == tokens
        logits = tome(x, mode="tensor")
        assert logits.shape == expected.shape
        if r == 0:
            assert torch.equal(logits, expected)


def test_format_tradeoff_rows():
    row = dict(name="plain", trained=True, metrics={"mIoU": 51.234}, agreement=100.0, images_per_s=12.34, speedup=1.0,
               speedup_fastest=1.0)
    text = format_tradeoff(dict(metric="mIoU", rows=[row, dict(row, name="ToMe r=8", trained=False, speedup=1.5)],
                                batch_size=8, img_size=96, threads=2, rounds=5, load_average=[1.0, 2.0]))
    assert "| plain | trained with it | 51.23 | 100.0 % | 12.3 | 1.00x | 1.00x |" in text
    assert "| ToMe r=8 | plain model's | 51.23 | 100.0 % | 12.3 | 1.50x | 1.00x |" in text


def test_bench_tokens_tool_times_every_variant_with_its_tokens(tmp_path):
    """tools/bench_tokens.py on two demo variants: one row each, the reference first at 1.00x,
    the tokens each block sees and fewer FLOPs under ToMe."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_tokens", "tools/bench_tokens.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "bench.json"
    assert tool.main(["--variants", "plain=configs/demo/cls_synthetic.yaml",
                      "tome=configs/demo/cls_synthetic_tome.yaml:model.backbone.token_reduction.r=4",
                      "--batch-size", "2", "--rounds", "2", "--iters", "1", "--warmup", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["plain", "tome"]
    assert rows[0]["speedup"] == 1.0 and all(len(r["times_s"]) == 2 for r in rows)
    assert rows[0]["tokens_per_block"] == [65] * 4 and rows[1]["tokens_per_block"] == [65, 61, 57, 53]
    assert rows[1]["gflops"] < rows[0]["gflops"]
