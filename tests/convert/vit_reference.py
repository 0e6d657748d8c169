"""Independent reference forwards for the converter tests, written with plain torch ops on the
SOURCE naming (timm-named state dicts; a Google-style ResNet written from the paper's recipe),
so that a converted vitasks model is checked against computations that share no code with it.

Also: random timm-named weights of tiny models, and their Google ``.npz`` layout.
"""

import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

SD = Dict[str, torch.Tensor]


# ------------------------------------------------------------------------------ random weights


def _rand(*shape, std=0.2, mean=0.0):
    return torch.randn(*shape) * std + mean


def timm_vit_weights(
    dim: int = 48,
    depth: int = 2,
    patch: int = 8,
    grid: int = 4,
    in_chans: int = 3,
    mlp_ratio: int = 4,
    num_classes: Optional[int] = 5,
    cls: bool = True,
    dist: bool = False,
    num_reg: int = 0,
    pos_prefix: Optional[int] = None,
    layer_scale: bool = False,
    fc_norm: bool = False,
    pre_logits: Optional[int] = None,
    qkv_bias: bool = True,
) -> SD:
    """A random timm-named ViT state dict. ``pos_prefix``: how many prefix tokens have a
    position embedding (default: all of them, timm's usual layout)."""
    num_prefix = int(cls) + int(dist) + num_reg
    pos_prefix = num_prefix if pos_prefix is None else pos_prefix
    hidden = dim * mlp_ratio
    sd: SD = {
        "patch_embed.proj.weight": _rand(dim, in_chans, patch, patch, std=0.1),
        "patch_embed.proj.bias": _rand(dim, std=0.1),
        "pos_embed": _rand(1, pos_prefix + grid * grid, dim, std=0.5),
    }
    if cls:
        sd["cls_token"] = _rand(1, 1, dim, std=0.5)
    if dist:
        sd["dist_token"] = _rand(1, 1, dim, std=0.5)
    if num_reg:
        sd["reg_token"] = _rand(1, num_reg, dim, std=0.5)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": _rand(dim, mean=1.0), b + "norm1.bias": _rand(dim, std=0.1),
            b + "attn.qkv.weight": _rand(3 * dim, dim, std=dim ** -0.5),
            b + "attn.proj.weight": _rand(dim, dim, std=dim ** -0.5), b + "attn.proj.bias": _rand(dim, std=0.1),
            b + "norm2.weight": _rand(dim, mean=1.0), b + "norm2.bias": _rand(dim, std=0.1),
            b + "mlp.fc1.weight": _rand(hidden, dim, std=dim ** -0.5), b + "mlp.fc1.bias": _rand(hidden, std=0.1),
            b + "mlp.fc2.weight": _rand(dim, hidden, std=hidden ** -0.5), b + "mlp.fc2.bias": _rand(dim, std=0.1),
        })
        if qkv_bias:
            sd[b + "attn.qkv.bias"] = _rand(3 * dim, std=0.1)
        if layer_scale:
            sd[b + "ls1.gamma"] = _rand(dim, std=0.3, mean=0.5)
            sd[b + "ls2.gamma"] = _rand(dim, std=0.3, mean=0.5)
    norm = "fc_norm" if fc_norm else "norm"
    sd[norm + ".weight"] = _rand(dim, mean=1.0)
    sd[norm + ".bias"] = _rand(dim, std=0.1)
    head_in = dim
    if pre_logits:
        sd["pre_logits.fc.weight"] = _rand(pre_logits, dim, std=dim ** -0.5)
        sd["pre_logits.fc.bias"] = _rand(pre_logits, std=0.1)
        head_in = pre_logits
    if num_classes:
        sd["head.weight"] = _rand(num_classes, head_in, std=head_in ** -0.5)
        sd["head.bias"] = _rand(num_classes, std=0.1)
        if dist:
            sd["head_dist.weight"] = _rand(num_classes, head_in, std=head_in ** -0.5)
            sd["head_dist.bias"] = _rand(num_classes, std=0.1)
    return sd


def timm_resnet_weights(
    in_chans: int = 3, stem: int = 32, layers=(1, 1), widths=(128, 256), conv_std: float = 0.1
) -> SD:
    """Random weights of timm's ResNetV2 body (non-pre-activation) under ``patch_embed.backbone``;
    ``conv_std``: spread of the conv kernels (small values make the standardisation epsilon
    matter)."""
    p = "patch_embed.backbone."
    sd = {
        p + "stem.conv.weight": _rand(stem, in_chans, 7, 7, std=conv_std),
        p + "stem.norm.weight": _rand(stem, mean=1.0), p + "stem.norm.bias": _rand(stem, std=0.1),
    }
    prev = stem
    for s, (n, w) in enumerate(zip(layers, widths)):
        mid = w // 4
        for b in range(n):
            q = f"{p}stages.{s}.blocks.{b}."
            cin = prev if b == 0 else w
            if b == 0:
                sd[q + "downsample.conv.weight"] = _rand(w, cin, 1, 1, std=conv_std)
                sd[q + "downsample.norm.weight"] = _rand(w, mean=1.0)
                sd[q + "downsample.norm.bias"] = _rand(w, std=0.1)
            for j, (ci, co, k) in enumerate([(cin, mid, 1), (mid, mid, 3), (mid, w, 1)], 1):
                sd[q + f"conv{j}.weight"] = _rand(co, ci, k, k, std=conv_std)
                sd[q + f"norm{j}.weight"] = _rand(co, mean=1.0)
                sd[q + f"norm{j}.bias"] = _rand(co, std=0.1)
        prev = w
    return sd


# ------------------------------------------------------------------------------ reference forward


def _ln(x, sd, name, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _linear(x, sd, name):
    y = x @ sd[name + ".weight"].t()
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def _gelu(x, act="gelu"):
    """``gelu``: exact, x * Phi(x) with the erf; ``gelu_tanh``: the tanh approximation of
    Hendrycks & Gimpel, what JAX's (and so flax's) ``nn.gelu`` computes by default."""
    if act == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    assert act == "gelu", act
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _same_pad(x, k, s, value=0.0):
    """TensorFlow SAME padding, written out: output ceil(n / s), extra pixel at the end."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def _std_conv(x, w, stride, ws, ws_eps):
    """Weight-standardised conv with SAME padding; ``ws`` is "timm" ((w - m) / sqrt(var + eps))
    or "google" (google-research/vision_transformer's StdConv: subtract the mean over the
    kernel's H, W, in axes, then divide by the population std plus eps)."""
    flat = w.reshape(w.shape[0], -1)
    m = flat.mean(1, keepdim=True)
    centred = flat - m
    var = (centred ** 2).mean(1, keepdim=True)
    if ws == "timm":
        flat = centred / torch.sqrt(var + ws_eps)
    else:
        assert ws == "google", ws
        flat = centred / (torch.sqrt(var) + ws_eps)
    return F.conv2d(_same_pad(x, w.shape[-1], stride), flat.reshape(w.shape), stride=stride)


def _gn(x, sd, name, eps, groups=32):
    B, C, H, W = x.shape
    g = x.reshape(B, groups, -1)
    mu = g.mean(-1, keepdim=True)
    var = ((g - mu) ** 2).mean(-1, keepdim=True)
    g = ((g - mu) / torch.sqrt(var + eps)).reshape(B, C, H, W)
    return g * sd[name + ".weight"].view(1, -1, 1, 1) + sd[name + ".bias"].view(1, -1, 1, 1)


def resnet_reference(sd: SD, x, ws="timm", ws_eps=1e-8, gn_eps=1e-5) -> torch.Tensor:
    """ResNetV2 body of the ViT hybrid (timm names under ``patch_embed.backbone``)."""
    p = "patch_embed.backbone."
    x = torch.relu(_gn(_std_conv(x, sd[p + "stem.conv.weight"], 2, ws, ws_eps), sd, p + "stem.norm", gn_eps))
    x = F.max_pool2d(_same_pad(x, 3, 2, value=float("-inf")), 3, 2)
    s = 0
    while f"{p}stages.{s}.blocks.0.conv1.weight" in sd:
        b = 0
        while f"{p}stages.{s}.blocks.{b}.conv1.weight" in sd:
            q = f"{p}stages.{s}.blocks.{b}."
            stride = 2 if (s > 0 and b == 0) else 1
            short = x
            if q + "downsample.conv.weight" in sd:
                short = _std_conv(x, sd[q + "downsample.conv.weight"], stride, ws, ws_eps)
                short = _gn(short, sd, q + "downsample.norm", gn_eps)
            y = torch.relu(_gn(_std_conv(x, sd[q + "conv1.weight"], 1, ws, ws_eps), sd, q + "norm1", gn_eps))
            y = torch.relu(_gn(_std_conv(y, sd[q + "conv2.weight"], stride, ws, ws_eps), sd, q + "norm2", gn_eps))
            y = _gn(_std_conv(y, sd[q + "conv3.weight"], 1, ws, ws_eps), sd, q + "norm3", gn_eps)
            x = torch.relu(y + short)
            b += 1
        s += 1
    return x


def vit_reference(
    sd: SD,
    x: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
    pool: str = "token",
    pos_prefix: Optional[int] = None,
    hybrid: Optional[dict] = None,
    return_features: bool = False,
    act: str = "gelu",
) -> Dict[str, torch.Tensor]:
    """timm-style ViT forward on a timm-named state dict; ``act`` is the MLP activation
    (``"gelu_tanh"`` for Google's JAX models, see :func:`_gelu`).

    Returns ``features`` (the pooled vector after the final norm / fc_norm), ``logits`` (class
    head), ``logits_dist`` and ``logits_avg`` (DeiT distilled), ``logits_pre`` (pre_logits ->
    tanh -> head) where those weights exist.
    """
    if hybrid is not None:
        x = resnet_reference(sd, x, **hybrid)
    w = sd["patch_embed.proj.weight"]
    x = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=w.shape[-1])
    B, C = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)
    prefix = []
    if "cls_token" in sd:
        prefix.append(sd["cls_token"])
    if "dist_token" in sd:
        prefix.append(sd["dist_token"])
    if "reg_token" in sd:
        prefix += list(sd["reg_token"].split(1, dim=1))
    P = len(prefix) if pos_prefix is None else pos_prefix
    pos = sd["pos_embed"]
    x = x + pos[:, P:]
    prefix = [t + pos[:, j : j + 1] if j < P else t for j, t in enumerate(prefix)]
    x = torch.cat([t.expand(B, -1, -1) for t in prefix] + [x], dim=1)
    N = x.shape[1]
    hd = C // num_heads
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b = f"blocks.{i}."
        qkv = _linear(_ln(x, sd, b + "norm1", eps), sd, b + "attn.qkv").reshape(B, N, 3, num_heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        y = _linear((a @ v).transpose(1, 2).reshape(B, N, C), sd, b + "attn.proj")
        x = x + y * sd.get(b + "ls1.gamma", 1.0)
        y = _linear(_gelu(_linear(_ln(x, sd, b + "norm2", eps), sd, b + "mlp.fc1"), act), sd, b + "mlp.fc2")
        x = x + y * sd.get(b + "ls2.gamma", 1.0)
        i += 1
    if "norm.weight" in sd:
        x = _ln(x, sd, "norm", eps)
    out = {}
    if pool == "token":
        f = x[:, 0]
    else:
        f = x[:, len(prefix):].mean(1)
    if "fc_norm.weight" in sd:
        f = _ln(f, sd, "fc_norm", eps)
    out["features"] = f
    out["tokens"] = x
    if "pre_logits.fc.weight" in sd:
        pre = torch.tanh(_linear(f, sd, "pre_logits.fc"))
        if "head.weight" in sd:
            out["logits_pre"] = _linear(pre, sd, "head")
    elif "head.weight" in sd:
        out["logits"] = _linear(f, sd, "head")
    if "head_dist.weight" in sd:
        out["logits_dist"] = _linear(x[:, 1], sd, "head_dist")
        out["logits_avg"] = (out["logits"] + out["logits_dist"]) / 2
    return out


# ------------------------------------------------------------------------------ timm itself


def timm_vit(sd: SD, num_heads: int, pool: str = "token", pos_prefix: Optional[int] = None) -> torch.nn.Module:
    """timm's own ViT (DeiT's distilled one for a ``dist_token``) built for a timm-named state dict
    of :func:`timm_vit_weights`, the weights loaded strictly, in eval mode. Skips the test where
    timm does not import (CI's first leg); CI's second leg has timm."""
    import pytest

    pytest.importorskip("timm")
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    extra = {}
    stride = 1
    if "patch_embed.backbone.stem.conv.weight" in sd:  # R50+ViT hybrid: timm's ResNetV2 body
        from functools import partial

        from timm.layers import StdConv2dSame
        from timm.models.resnetv2 import ResNetV2
        from timm.models.vision_transformer_hybrid import HybridEmbed

        p = "patch_embed.backbone."
        layers, widths = [], []
        while f"{p}stages.{len(layers)}.blocks.0.conv1.weight" in sd:
            blocks = 0
            while f"{p}stages.{len(layers)}.blocks.{blocks}.conv1.weight" in sd:
                blocks += 1
            widths.append(sd[f"{p}stages.{len(layers)}.blocks.0.conv3.weight"].shape[0])
            layers.append(blocks)
        body = ResNetV2(
            layers=layers, channels=widths, stem_chs=sd[p + "stem.conv.weight"].shape[0], num_classes=0,
            global_pool="", in_chans=sd[p + "stem.conv.weight"].shape[1], preact=False, stem_type="same",
            conv_layer=partial(StdConv2dSame, eps=1e-8),
        )
        extra["embed_layer"] = partial(HybridEmbed, backbone=body)
        stride = 4 * 2 ** (len(layers) - 1)  # stem (conv and max-pool) and one per later stage

    proj = sd["patch_embed.proj.weight"]
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    num_prefix = ("cls_token" in sd) + ("dist_token" in sd) + (sd["reg_token"].shape[1] if "reg_token" in sd else 0)
    pos_prefix = num_prefix if pos_prefix is None else pos_prefix
    grid = math.isqrt(sd["pos_embed"].shape[1] - pos_prefix)
    depth = 0
    while f"blocks.{depth}.norm1.weight" in sd:
        depth += 1
    if extra:
        in_chans = sd["patch_embed.backbone.stem.conv.weight"].shape[1]
    kwargs = dict(
        img_size=grid * patch * stride, patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=depth,
        num_heads=num_heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        qkv_bias="blocks.0.attn.qkv.bias" in sd, num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        global_pool="token" if pool == "token" else "avg", fc_norm="fc_norm.weight" in sd,
        init_values=1.0 if "blocks.0.ls1.gamma" in sd else None, no_embed_class=pos_prefix == 0, **extra,
    )
    if "dist_token" in sd:
        model = VisionTransformerDistilled(**kwargs)
    else:
        model = VisionTransformer(class_token="cls_token" in sd,
                                  reg_tokens=sd["reg_token"].shape[1] if "reg_token" in sd else 0, **kwargs)
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------ Google layout


def to_google_npz(sd: SD, path: str, prefix: str = "", num_heads: int = 2, linen_names: bool = False) -> None:
    """Write a timm-named ViT (optionally hybrid) in google-research/vision_transformer's .npz
    layout: HWIO convs, (in, out) dense kernels, per-head attention kernels."""
    n = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    conv = lambda t: n(t.permute(2, 3, 1, 0))  # noqa: E731  OIHW -> HWIO
    dense = lambda t: n(t.t())  # noqa: E731
    out = {}
    C = sd["patch_embed.proj.weight"].shape[0]
    hd = C // num_heads
    out["embedding/kernel"] = conv(sd["patch_embed.proj.weight"])
    out["embedding/bias"] = n(sd["patch_embed.proj.bias"])
    if "cls_token" in sd:
        out["cls"] = n(sd["cls_token"])
    out["Transformer/posembed_input/pos_embedding"] = n(sd["pos_embed"])
    out["Transformer/encoder_norm/scale"] = n(sd["norm.weight"])
    out["Transformer/encoder_norm/bias"] = n(sd["norm.bias"])
    ln0, mha, ln1, mlp = (("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
                          if linen_names else
                          ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"))
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        out[g + ln0 + "/scale"], out[g + ln0 + "/bias"] = n(sd[b + "norm1.weight"]), n(sd[b + "norm1.bias"])
        out[g + ln1 + "/scale"], out[g + ln1 + "/bias"] = n(sd[b + "norm2.weight"]), n(sd[b + "norm2.bias"])
        wq, wk, wv = sd[b + "attn.qkv.weight"].chunk(3, dim=0)
        bq, bk, bv = sd[b + "attn.qkv.bias"].chunk(3, dim=0)
        for name, wt, bs in (("query", wq, bq), ("key", wk, bk), ("value", wv, bv)):
            out[f"{g}{mha}/{name}/kernel"] = n(wt.t().reshape(C, num_heads, hd))
            out[f"{g}{mha}/{name}/bias"] = n(bs.reshape(num_heads, hd))
        out[f"{g}{mha}/out/kernel"] = n(sd[b + "attn.proj.weight"].t().reshape(num_heads, hd, C))
        out[f"{g}{mha}/out/bias"] = n(sd[b + "attn.proj.bias"])
        for j in range(2):
            out[f"{g}{mlp}/Dense_{j}/kernel"] = dense(sd[f"{b}mlp.fc{j + 1}.weight"])
            out[f"{g}{mlp}/Dense_{j}/bias"] = n(sd[f"{b}mlp.fc{j + 1}.bias"])
        i += 1
    if "head.weight" in sd:
        out["head/kernel"], out["head/bias"] = dense(sd["head.weight"]), n(sd["head.bias"])
    if "pre_logits.fc.weight" in sd:
        out["pre_logits/kernel"] = dense(sd["pre_logits.fc.weight"])
        out["pre_logits/bias"] = n(sd["pre_logits.fc.bias"])
    p = "patch_embed.backbone."
    if p + "stem.conv.weight" in sd:
        out["conv_root/kernel"] = conv(sd[p + "stem.conv.weight"])
        # Older flax GroupNorm params carried leading singleton dims: exercise the squeeze.
        out["gn_root/scale"] = n(sd[p + "stem.norm.weight"]).reshape(1, 1, 1, -1)
        out["gn_root/bias"] = n(sd[p + "stem.norm.bias"]).reshape(1, 1, 1, -1)
        for k, v in sd.items():
            if not k.startswith(p + "stages."):
                continue
            parts = k[len(p):].split(".")  # stages, s, blocks, b, layer..., weight|bias
            s, u = int(parts[1]) + 1, int(parts[3]) + 1
            layer = ".".join(parts[4:-1])
            kind = parts[-1]
            g = {"downsample.conv": "conv_proj", "downsample.norm": "gn_proj"}.get(layer, layer.replace("norm", "gn"))
            if g.startswith("conv"):
                out[f"block{s}/unit{u}/{g}/kernel"] = conv(v)
            else:
                out[f"block{s}/unit{u}/{g}/{'scale' if kind == 'weight' else 'bias'}"] = n(v)
    np.savez(path, **{prefix + k: v for k, v in out.items()})


def image_batch(n: int = 2, size: int = 32, chans: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, chans, size, size, generator=g)


def build_classifier(meta: dict, num_classes: Optional[int] = None, **overrides):
    """An ImageClassifier built from a conversion's config hint (eval mode)."""
    from vitasks.registry import MODELS

    import vitasks.models  # noqa: F401  (registers the modules)

    backbone = dict(type="VisionTransformer", **meta["config_hint"])
    backbone.update(overrides)
    head = dict(meta["head_hint"])
    if num_classes is not None:
        head["num_classes"] = num_classes
    model = MODELS.build(dict(type="ImageClassifier", backbone=backbone, head=head))
    return model.eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Relative difference (max abs error / max abs value) below ``rel``."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * max(scale, 1e-6), f"max abs error {err:.3g} vs scale {scale:.3g}"


def all_keys_loaded(model, state_dict: SD, allow_missing: Sequence[str] = ()) -> None:
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(tuple(allow_missing))]
    assert not missing, missing
    assert not result.unexpected_keys, result.unexpected_keys
