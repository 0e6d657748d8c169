"""FLOP counting of tools/benchmark.py against published and analytical numbers, and a tiny
end-to-end run (no timed assertions)."""

import json

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from vitasks.apis import build_model
from vitasks.benchmarks.throughput import count_model_flops, format_table, init_on_meta, matmul_flops, run_benchmark
from vitasks.benchmarks.machine import cpu_info, parse_cpuinfo
from vitasks.cli import main as cli_main
from vitasks.config import load_config


def benchmark_main(argv):
    return cli_main(["benchmark", *argv])


def vit_macs(img=224, patch=16, dim=768, depth=12, mlp_ratio=4, classes=1000, in_ch=3):
    """Multiply-adds of a ViT with a class token, by hand."""
    p = (img // patch) ** 2
    n = p + 1
    stem = p * dim * in_ch * patch * patch
    block = n * dim * 3 * dim + n * dim * dim + 2 * n * n * dim + 2 * n * dim * mlp_ratio * dim
    return stem + depth * block + dim * classes


def meta_model(config, options=None):
    cfg = load_config(config, options)
    with init_on_meta():
        model = build_model(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    return model


def test_vit_b16_flops_match_the_published_17_6_gmacs():
    model = meta_model("configs/cls_imagenet.yaml")
    x = torch.empty(1, 3, 224, 224, device="meta")
    flops = count_model_flops(model, x)
    assert flops == 2 * vit_macs()
    assert flops / 2e9 == pytest.approx(17.6, rel=0.02)  # DeiT / timm: ViT-B/16 at 224, 17.6 G(MAC)s
    # Training = forward + backward: twice the forward again, except the input gradient of the
    # patch embedding, which nothing needs.
    train = count_model_flops(model, x, train=True)
    assert train == 3 * flops - 2 * 196 * 768 * 3 * 16 * 16


def test_matmul_reference_flops():
    assert matmul_flops(4096, 4096, 4096) == 2 * 4096**3
    a, b = torch.empty(64, 48, device="meta"), torch.empty(48, 80, device="meta")
    with FlopCounterMode(display=False) as counter:
        a @ b
    assert counter.get_total_flops() == matmul_flops(64, 80, 48)


def tiny_config(tmp_path):
    cfg = {
        "num_classes": 5,
        "img_size": 16,
        "model": {
            "type": "ImageClassifier",
            "backbone": {"type": "VisionTransformer", "img_size": "${img_size}", "patch_size": 4,
                         "embed_dim": 32, "depth": 2, "num_heads": 2},
            "head": {"type": "LinearClsHead", "num_classes": "${num_classes}", "in_channels": 32},
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_attention_is_counted_on_the_cpu_kernel_too(tmp_path):
    """FlopCounterMode alone counts SDPA's fused CPU kernel as 0; ours counts it as on meta."""
    config = tiny_config(tmp_path)
    cpu = build_model(load_config(config)).eval()
    x = torch.randn(2, 3, 16, 16)
    on_meta = count_model_flops(meta_model(config), torch.empty(2, 3, 16, 16, device="meta"))
    assert count_model_flops(cpu, x) == on_meta == 2 * 2 * vit_macs(16, 4, 32, 2, 4, 5)
    assert count_model_flops(cpu, x, train=True) == count_model_flops(
        meta_model(config), torch.empty(2, 3, 16, 16, device="meta"), train=True)


def test_run_benchmark_end_to_end(tmp_path):
    config = tiny_config(tmp_path)
    result = run_benchmark(config, batch_size=2, amp=True, grad_ckpt=True, img_size=24, iters=1, warmup=0,
                           matmul_size=64, matmul_iters=1, device="cpu")
    assert result["input_shape"] == [2, 3, 24, 24]
    assert result["gmacs_per_sample"]["inference"] * 1e9 == pytest.approx(vit_macs(24, 4, 32, 2, 4, 5))
    assert set(result["phases"]) == {"inference", "training"}
    assert set(result["matmul"]["tflops"]) == {"float32", "bfloat16"}
    for phase in result["phases"].values():
        assert phase["images_per_s"] > 0 and phase["peak_memory_mib"] >= 0
        assert phase["tflops"] == pytest.approx(
            phase["images_per_s"] * result["gflops_per_sample"]["inference" if phase is result["phases"]["inference"]
                                                                else "training"] / 1e3)
        assert set(phase["ratio_to_matmul"]) == {"float32", "bfloat16"}
    table = format_table(result)
    assert "inference" in table and "training" in table and "GMACs" in table


def test_benchmark_command_writes_json(tmp_path, capsys):
    config = tiny_config(tmp_path)
    out = tmp_path / "bench.json"
    assert benchmark_main([config, "--batch-size", "1", "--iters", "1", "--warmup", "0", "--matmul-size", "32",
                 "--matmul-iters", "1", "--no-train", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data["phases"]) == ["inference"]
    assert "images/s" in capsys.readouterr().out
    assert benchmark_main([str(tmp_path / "missing.yaml")]) == 2


def test_no_train_prints_na_not_zero_training_flops(tmp_path, capsys):
    config = tiny_config(tmp_path)
    out = tmp_path / "bench.json"
    assert benchmark_main([config, "--batch-size", "1", "--iters", "2", "--warmup", "1", "--matmul-size", "32",
                 "--matmul-iters", "3", "--no-train", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    flops_line = next(line for line in text.splitlines() if line.startswith("params"))
    assert flops_line.endswith("training (fwd+bwd) n/a")
    data = json.loads(out.read_text())
    assert data["gflops_per_sample"]["training"] is None and data["gmacs_per_sample"]["training"] is None
    phase = data["phases"]["inference"]
    assert len(phase["times_s"]) == 2 and phase["first_iter_s"] > 0
    assert phase["median_s"] == pytest.approx(sorted(phase["times_s"])[0] / 2 + sorted(phase["times_s"])[1] / 2)
    # The reference: 3 matmuls before the model and 3 after, median of all 6.
    samples = data["matmul"]["samples_tflops"]["float32"]
    assert len(samples) == 6
    assert data["matmul"]["tflops"]["float32"] == pytest.approx(sorted(samples)[2] / 2 + sorted(samples)[3] / 2)


def test_training_step_uses_the_configs_optimizer(tmp_path):
    """The timed step runs the optimizer training would build (type, options, param groups)."""
    config = tiny_config(tmp_path)
    result = run_benchmark(config, batch_size=1, iters=1, warmup=0, matmul_size=32, matmul_iters=1, device="cpu",
                           cfg_options={"optim_wrapper": {"type": "OptimWrapper", "optimizer": {
                               "type": "AdamW", "lr": 1e-3, "weight_decay": 0.05, "fused": True},
                               "paramwise_cfg": {"norm_decay_mult": 0.0}}})
    assert result["optimizer"].startswith("AdamW(") and "fused=True" in result["optimizer"]
    assert "config optim_wrapper" in result["optimizer"]
    default = run_benchmark(config, batch_size=1, iters=1, warmup=0, matmul_size=32, matmul_iters=1, device="cpu")
    assert default["optimizer"].startswith("AdamW(") and "default" in default["optimizer"]


def test_fused_adamw_matches_the_for_loop_implementation():
    """`fused: true` in a schedule changes speed only: the same updates to float rounding."""
    torch.manual_seed(0)
    params = [torch.randn(7, 5), torch.randn(5), torch.randn(3, 2, 4)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
    results = []
    for kwargs in ({"foreach": False}, {"fused": True}):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, **kwargs)
        for step in grads:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach() for p in ps])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_the_cpus_capability_is_printed_beside_the_table(tmp_path, monkeypatch, capsys):
    import vitasks.benchmarks.throughput as benchmark

    config = tiny_config(tmp_path)
    args = [config, "--batch-size", "1", "--iters", "1", "--warmup", "0", "--matmul-size", "32",
            "--matmul-iters", "1", "--no-train", "--device", "cpu"]
    # This machine, as the detection sees it.
    assert benchmark_main(args) == 0
    out = capsys.readouterr().out
    this = cpu_info()
    cpu_line = next(line for line in out.splitlines() if line.startswith("cpu: "))
    assert this.model_name in cpu_line and f"ISA {this.isa}" in cpu_line and "native bf16:" in cpu_line
    assert "warning:" not in out  # no --amp, nothing to warn about
    # An AVX2-only CPU under --amp: the table says bf16 is emulated and slower.
    avx2 = parse_cpuinfo("model name\t: Old Xeon\nflags\t\t: fpu sse avx avx2\n", "x86_64", isa="AVX2")
    monkeypatch.setattr(benchmark, "cpu_info", lambda: avx2)
    out_json = tmp_path / "bench.json"
    assert benchmark_main(args + ["--amp", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "cpu: Old Xeon [x86_64], ISA AVX2, native bf16: no" in out
    warning = next(line for line in out.splitlines() if line.startswith("warning: "))
    assert "Old Xeon" in warning and "slower than float32" in warning
    data = json.loads(out_json.read_text())
    assert data["cpu"]["bf16"] is False and data["cpu"]["flags"] == ["avx2"]
    # A CPU with AMX: --amp is fine, no warning.
    amx = parse_cpuinfo("model name\t: New Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16\n",
                        "x86_64", isa="AVX512")
    monkeypatch.setattr(benchmark, "cpu_info", lambda: amx)
    assert benchmark_main(args + ["--amp"]) == 0
    out = capsys.readouterr().out
    assert "native bf16: yes (avx512_bf16, amx_bf16)" in out and "warning:" not in out
