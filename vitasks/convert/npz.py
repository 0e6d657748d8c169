"""Google's ``.npz`` ViT releases (google-research/vision_transformer: the original ViT and
AugReg checkpoints, plain and R50 hybrid), read with ``np.load(allow_pickle=False)``.

Layout (flax parameter paths joined with ``/``, sometimes under ``opt/target/``):

- ``embedding/{kernel,bias}``: the patchify conv, kernel HWIO -> torch OIHW;
- ``cls`` (1, 1, C); ``Transformer/posembed_input/pos_embedding`` (1, N, C);
- ``Transformer/encoderblock_{i}/``: ``LayerNorm_0`` and ``LayerNorm_2`` (pre-linen numbering;
  linen's ``LayerNorm_1`` also read: the first is norm1, the second norm2, ``scale`` ->
  weight), ``MultiHeadDotProductAttention_1/{query,key,value}/kernel`` (C, heads, head_dim) and
  ``bias`` (heads, head_dim) -> fused qkv, ``.../out/kernel`` (heads, head_dim, C) -> proj,
  ``MlpBlock_3/Dense_{0,1}`` -> fc1, fc2 (dense kernels are (in, out): transposed);
- ``Transformer/encoder_norm``; ``head/{kernel,bias}``; ``pre_logits/{kernel,bias}`` (the
  tanh representation layer of some ImageNet-21k checkpoints, dropped unless kept);
- hybrid: ``conv_root/kernel``, ``gn_root``, ``block{s}/unit{u}/conv{1,2,3}``, ``gn{1,2,3}``,
  ``conv_proj``, ``gn_proj`` -> ``ResNetStem``.

Conventions of the source, all reproduced by the config hint (so a converted model gives the
JAX model's outputs to float32 rounding): flax LayerNorm eps 1e-6; the MLP activation is flax's
``nn.gelu``, whose default is the tanh approximation (``mlp_act: gelu_tanh``); the hybrid's
``StdConv`` standardises each kernel as ``(w - mean) / (std + 1e-5)`` (``ws_form: std``,
``ws_eps: 1e-5``; timm's port of the same weights uses ``sqrt(var + 1e-8)`` and exact GELU, a
small output difference), flax GroupNorm eps 1e-6 (32 groups); a class token model pools the
class token, a ``gap`` model (no ``cls``) averages all tokens after the encoder norm.
"""

import os
import re
import zipfile
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from vitasks.convert.common import INCEPTION_NORM, ConvertOptions, Source, StateDict
from vitasks.errors import CheckpointError

#: Google's hybrid: ``StdConv`` divides by std + 1e-5; flax GroupNorm (32 groups, eps 1e-6).
GOOGLE_HYBRID_STEM = dict(num_groups=32, ws_eps=1e-5, ws_form="std", gn_eps=1e-6)
#: flax ``nn.gelu`` defaults to the tanh approximation.
GOOGLE_MLP_ACT = "gelu_tanh"

_BLOCK_RE = re.compile(r"^Transformer/encoderblock_(\d+)/")
_HYBRID_RE = re.compile(r"^block(\d+)/unit(\d+)/(conv[123]|conv_proj|gn[123]|gn_proj)/(kernel|scale|bias)$")


def load_npz(path: str) -> Dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, refusing pickled objects."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise CheckpointError(f"{path}: expected an .npz archive of named arrays")
            return {k: data[k] for k in data.files}
    except AttributeError:  # np.load returned a plain array (an .npy file): no context manager
        raise CheckpointError(f"{path}: expected an .npz archive of named arrays, found a single .npy array") from None
    except ValueError as e:
        if "pickle" in str(e):
            raise CheckpointError(
                f"{path}: the file holds pickled Python objects, which could run code; refused "
                "(Google's .npz checkpoints hold plain arrays only)"
            ) from None
        raise CheckpointError(f"{path}: not a readable .npz file ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable .npz file ({e})") from None


def _t(a: np.ndarray) -> torch.Tensor:
    if a.dtype.kind not in "fiu":
        raise CheckpointError(f"unsupported array dtype {a.dtype} in the .npz file")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _conv(a: np.ndarray) -> torch.Tensor:
    return _t(a).permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW


def _dense(a: np.ndarray) -> torch.Tensor:
    return _t(a).t().contiguous()  # (in, out) -> (out, in)


def _vec(a: np.ndarray) -> torch.Tensor:
    return _t(a).reshape(-1)  # older flax GroupNorm params carry leading 1s


def npz_to_timm(w: Dict[str, np.ndarray], where: str) -> Tuple[StateDict, Optional[int]]:
    """Map Google's arrays to timm names; returns the state dict and the number of heads."""
    roots = [k[: -len("embedding/kernel")] for k in w if k.endswith("embedding/kernel") and "posembed" not in k]
    if len(roots) != 1 or "Transformer/encoder_norm/scale" not in {k[len(roots[0]):] for k in w}:
        raise CheckpointError(
            f"{where}: not a google-research/vision_transformer checkpoint (expected keys "
            "embedding/kernel, Transformer/encoderblock_0/..., Transformer/encoder_norm/scale)"
        )
    root = roots[0]
    w = {k[len(root):]: v for k, v in w.items() if k.startswith(root)}
    used = set()

    def get(key: str) -> np.ndarray:
        if key not in w:
            raise CheckpointError(f"{where}: missing array {root}{key}")
        used.add(key)
        return w[key]

    sd: StateDict = {
        "patch_embed.proj.weight": _conv(get("embedding/kernel")),
        "patch_embed.proj.bias": _vec(get("embedding/bias")),
        "pos_embed": _t(get("Transformer/posembed_input/pos_embedding")),
        "norm.weight": _vec(get("Transformer/encoder_norm/scale")),
        "norm.bias": _vec(get("Transformer/encoder_norm/bias")),
    }
    if "cls" in w:
        sd["cls_token"] = _t(get("cls")).reshape(1, 1, -1)
    for name, out in (("head", "head"), ("pre_logits", "pre_logits.fc")):
        if f"{name}/kernel" in w:
            sd[f"{out}.weight"] = _dense(get(f"{name}/kernel"))
            sd[f"{out}.bias"] = _vec(get(f"{name}/bias"))

    num_heads = None
    blocks = sorted({int(m.group(1)) for k in w for m in [_BLOCK_RE.match(k)] if m})
    for i in blocks:
        p = f"Transformer/encoderblock_{i}/"
        subs = {k[len(p):].split("/")[0] for k in w if k.startswith(p)}

        def numbered(kind):
            return sorted((s for s in subs if re.fullmatch(kind + r"_\d+", s)), key=lambda s: int(s.rsplit("_", 1)[1]))

        norms, attn, mlp = numbered("LayerNorm"), numbered("MultiHeadDotProductAttention"), numbered("MlpBlock")
        if len(norms) != 2 or len(attn) != 1 or len(mlp) != 1:
            raise CheckpointError(
                f"{where}: block {i} has {sorted(subs)}; expected two LayerNorm_*, one "
                "MultiHeadDotProductAttention_* and one MlpBlock_*"
            )
        b = f"blocks.{i}."
        for j, n in enumerate(norms, 1):
            sd[f"{b}norm{j}.weight"] = _vec(get(f"{p}{n}/scale"))
            sd[f"{b}norm{j}.bias"] = _vec(get(f"{p}{n}/bias"))
        a = f"{p}{attn[0]}/"
        q = get(a + "query/kernel")
        if q.ndim != 3:
            raise CheckpointError(f"{where}: {root}{a}query/kernel should be (C, heads, head_dim), got {q.shape}")
        num_heads = q.shape[1]
        sd[b + "attn.qkv.weight"] = torch.cat(
            [_t(get(a + f"{n}/kernel")).flatten(1).t() for n in ("query", "key", "value")]
        ).contiguous()
        if a + "query/bias" in w:
            sd[b + "attn.qkv.bias"] = torch.cat([_vec(get(a + f"{n}/bias")) for n in ("query", "key", "value")])
        sd[b + "attn.proj.weight"] = _t(get(a + "out/kernel")).flatten(0, 1).t().contiguous()
        sd[b + "attn.proj.bias"] = _vec(get(a + "out/bias"))
        for j in range(2):
            d = f"{p}{mlp[0]}/Dense_{j}/"
            sd[f"{b}mlp.fc{j + 1}.weight"] = _dense(get(d + "kernel"))
            sd[f"{b}mlp.fc{j + 1}.bias"] = _vec(get(d + "bias"))

    # R50 hybrid: the ResNet root and stages.
    if "conv_root/kernel" in w:
        rb = "patch_embed.backbone."
        sd[rb + "stem.conv.weight"] = _conv(get("conv_root/kernel"))
        sd[rb + "stem.norm.weight"] = _vec(get("gn_root/scale"))
        sd[rb + "stem.norm.bias"] = _vec(get("gn_root/bias"))
        for k in list(w):
            m = _HYBRID_RE.match(k)
            if not m:
                continue
            s, u, layer, kind = m.groups()
            dst = {"conv_proj": "downsample.conv", "gn_proj": "downsample.norm"}.get(
                layer, layer.replace("gn", "norm")
            )
            name = f"{rb}stages.{int(s) - 1}.blocks.{int(u) - 1}.{dst}."
            if kind == "kernel":
                sd[name + "weight"] = _conv(get(k))
            else:
                sd[name + ("weight" if kind == "scale" else "bias")] = _vec(get(k))

    unused = sorted(set(w) - used)
    if unused:
        raise CheckpointError(f"{where}: {len(unused)} arrays are not part of a ViT checkpoint: {unused[:10]}")
    return sd, num_heads


def read(path: str, opts: ConvertOptions) -> Source:
    """A Google ``.npz`` ViT / R50+ViT checkpoint."""
    sd, num_heads = npz_to_timm(load_npz(path), path)
    src = Source(fmt="npz", path=path, state_dict=sd, norm_eps=1e-6, num_heads=num_heads,
                 mlp_act=GOOGLE_MLP_ACT, stem=dict(GOOGLE_HYBRID_STEM), input_norm=dict(INCEPTION_NORM))
    hybrid = any(k.startswith("patch_embed.backbone.") for k in sd)
    src.notes.append(
        "Google's JAX conventions: tanh-approximated GELU (mlp_act: gelu_tanh)"
        + (", weight standardisation by std + 1e-5 (stem ws_form: std, ws_eps: 1e-5)" if hybrid else "")
        + "; keep them in the config for the source model's exact outputs"
    )
    return src
