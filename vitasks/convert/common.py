"""What every converter shares: safe reading, the timm-named intermediate, fine-tuning edits
(heads, final norm, position-embedding resampling), the mapping to vitasks names, saving.

Each source module (``timm``, ``hf``, ``npz``, ``mae``, ``deit``) only translates its own names
and layouts into a :class:`Source`, a state dict in timm's ViT naming (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.{i}.attn.qkv``, ``norm``, ``fc_norm``, ``head``, ...) plus
what the source says about conventions the weights cannot (LayerNorm epsilon, number of heads).
:func:`to_vitasks` then does everything else once.
"""

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from vitasks.checks import int_pair
from vitasks.errors import CheckpointError, ConfigError

Tensor = torch.Tensor
StateDict = Dict[str, Tensor]

#: Heads of the published ViT sizes, by width: tiny, small, base, large, huge, giant (g/14),
#: gigantic (G/14). A timm-named state dict does not record the head count (the fused qkv weight
#: is (3C, C) whatever it is); other widths fall back to 64-channel heads.
NUM_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}

#: Input normalisations (0-255 RGB): ImageNet statistics (DeiT, MAE) and [-1, 1] (Google).
IMAGENET_NORM = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])
INCEPTION_NORM = dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5])

#: Wrappers a training script puts around the state dict, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model", "module", "params")

_POOLS = ("token", "mean", "token_mean")


@dataclass
class ConvertOptions:
    """Fine-tuning edits applied while converting (see :func:`vitasks.convert.convert_checkpoint`)."""

    img_size: Optional[Union[int, Tuple[int, int]]] = None
    num_classes: Optional[int] = None
    drop_head: bool = False
    drop_final_norm: bool = False
    pool: Optional[str] = None
    num_heads: Optional[int] = None
    keep_pre_logits: bool = False


@dataclass
class Source:
    """A checkpoint read into timm's ViT naming, with what its origin says beyond the weights.

    Attributes:
        fmt: the converter's name (``timm``, ``hf``, ...).
        path: the file (or folder) read.
        state_dict: tensors under timm names (see the module docstring).
        norm_eps: LayerNorm epsilon of the source model.
        mlp_act: the MLP activation (``"gelu"`` exact, ``"gelu_tanh"`` JAX's approximation).
        num_heads: attention heads when the source states them (None: from the width).
        grid: the source's token grid (rows, cols) when a config states it (None: square,
            from the position embedding's length).
        pool / fc_norm / final_norm: the source's pooling when the weights don't say (None:
            inferred from the keys).
        stem: keyword overrides for the hybrid's ``ResNetStem`` (epsilon conventions).
        input_norm: the input normalisation the weights were trained with (``mean``/``std`` in
            0-255 RGB, the data preprocessor's convention), when the source says.
        pos_interp: how the source resamples its position embeddings for other input sizes, as
            backbone options (``interpolate_mode``, ``interpolate_antialias``,
            ``interpolate_offset``); recorded in the config hint and used for ``img_size``.
            Empty: vitasks' default (bicubic to the target size).
        notes: messages for the user (what was dropped or assumed).
    """

    fmt: str
    path: str
    state_dict: StateDict
    norm_eps: float = 1e-6
    mlp_act: str = "gelu"
    num_heads: Optional[int] = None
    grid: Optional[Tuple[int, int]] = None
    pool: Optional[str] = None
    fc_norm: Optional[bool] = None
    final_norm: Optional[bool] = None
    stem: Dict[str, Any] = field(default_factory=dict)
    input_norm: Optional[Dict[str, List[float]]] = None
    pos_interp: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Reading


def _safe_load(path: str) -> Any:
    """Load a torch/safetensors file without running code (the runtime's safe loader)."""
    from vitasks.engine.checkpoint import load_state_dict_file

    return load_state_dict_file(path)


def unwrap_state_dict(obj: Any, path: str, prefer: Sequence[str] = _WRAPPER_KEYS) -> StateDict:
    """The tensor dict inside a loaded checkpoint: a plain state dict, or one under
    ``state_dict`` / ``model`` / ``module`` (as training scripts save them); non-tensor entries
    are ignored and ``module.`` prefixes (DataParallel) removed."""
    for _ in range(3):
        inner = None
        if isinstance(obj, dict):
            inner = next((obj[k] for k in prefer if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)} if isinstance(obj, dict) else {}
    if not sd:
        found = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path}: expected a state dict (name -> tensor), or one under one of "
            f"{list(prefer)}; found {found}"
        )
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_torch_state_dict(path: str, prefer: Sequence[str] = _WRAPPER_KEYS) -> StateDict:
    """Read a ``.pth`` / ``.bin`` / ``.safetensors`` file safely and return its state dict."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    return unwrap_state_dict(_safe_load(path), path, prefer)


# --------------------------------------------------------------------------------------------
# Small helpers


def block_indices(sd: StateDict, prefix: str = "blocks.") -> List[int]:
    """Sorted indices i of the keys ``{prefix}{i}.*``."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def _pair(size: Union[int, Sequence[int]], what: str) -> Tuple[int, int]:
    """A checkpoint's (or an option's) image size ``N`` or ``(H, W)``; a bad one is a CheckpointError."""
    try:
        return int_pair(size, what, "a positive int or (height, width)")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def fuse_qkv(qkv: Dict[str, Dict[str, Dict[str, Tensor]]], where: str,
             zero_missing_bias: bool = False) -> StateDict:
    """``blocks.{i}.attn.qkv.{weight,bias}`` from separate query, key and value projections
    (``qkv[i][kind][q|k|v]``, as transformers stores them). With ``zero_missing_bias`` a missing
    bias (BEiT's and VideoMAE's key) is zero, which gives the same attention (softmax ignores a
    per-query constant); otherwise every projection needs both."""
    out: StateDict = {}
    for i, kinds in qkv.items():
        weights, biases = kinds.get("weight", {}), kinds.get("bias", {})
        if set(weights) != set("qkv") or (biases and not zero_missing_bias and set(biases) != set("qkv")):
            raise CheckpointError(f"{where}: layer {i} has query/key/value weights for {sorted(weights)} and biases "
                                  f"for {sorted(biases)}; expected query, key and value")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([weights[p] for p in "qkv"], dim=0)
        if biases:
            zero = torch.zeros_like(weights["q"][:, 0])
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([biases.get(p, zero) for p in "qkv"], dim=0)
    return out


# --------------------------------------------------------------------------------------------
# transformers' encoder names (ViT, DeiT, BEiT/Data2Vec, DINOv2, TimeSformer, VideoMAE, ViViT)
# --------------------------------------------------------------------------------------------

#: A layer's modules (hub and transformers 5 names) -> the block's modules.
HF_LAYER_PARTS = {
    "attention.output.dense": "attn.proj",   # hub
    "attention.o_proj": "attn.proj",         # transformers 5
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
#: A layer's separate query, key and value projections, fused into ``attn.qkv``.
HF_QKV_PARTS = {
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
}
#: The embeddings and final norm -> timm's names (ViT, DeiT, DINOv2).
HF_TOP_TIMM = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
HF_LAYER_RE = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")


class HFEncoderNames:
    """Renames the weights of a transformers encoder (without the model's prefix) into timm's or
    vitasks' block names: ``top`` maps whole names (embeddings, final norm); a layer's weight
    (``encoder.layer.{i}.<rest>`` or ``layers.{i}.<rest>``) goes by ``parts`` (its whole
    ``<rest>``, or its module name with ``weight``/``bias``) to ``blocks.{i}.<name>``, and its
    query/key/value projections are fused (:func:`fuse_qkv`)."""

    def __init__(self, top: Dict[str, str], parts: Dict[str, str]) -> None:
        self.top, self.parts = top, parts
        self.out: StateDict = {}
        self.qkv: Dict[str, Dict[str, Dict[str, Tensor]]] = {}
        self.unknown: List[str] = []

    def add_qkv(self, layer: str, kind: str, which: str, value: Tensor) -> None:
        self.qkv.setdefault(layer, {}).setdefault(kind, {})[which] = value

    def place(self, name: str, value: Tensor) -> bool:
        """Put ``name`` (without the model's prefix) where it goes; False if it is none of these."""
        if name in self.top:
            self.out[self.top[name]] = value
            return True
        m = HF_LAYER_RE.match(name)
        if not m:
            return False
        i, rest = m.groups()
        if rest in self.parts:
            self.out[f"blocks.{i}.{self.parts[rest]}"] = value
            return True
        module, _, kind = rest.rpartition(".")
        if kind not in ("weight", "bias"):
            return False
        if module in HF_QKV_PARTS:
            self.add_qkv(i, kind, HF_QKV_PARTS[module], value)
            return True
        if module in self.parts:
            self.out[f"blocks.{i}.{self.parts[module]}.{kind}"] = value
            return True
        return False

    def result(self, where: str, model: str, expected: str, zero_missing_bias: bool = False) -> StateDict:
        """The renamed weights, q/k/v fused; any weight left in ``unknown`` is a CheckpointError
        saying it is not one of a transformers ``model`` (whose names are ``expected``)."""
        if self.unknown:
            raise CheckpointError(f"{where}: {len(self.unknown)} weights are not those of a transformers {model} "
                                  f"({expected}): {sorted(self.unknown)[:10]}")
        self.out.update(fuse_qkv(self.qkv, where, zero_missing_bias=zero_missing_bias))
        return self.out


def _square_side(n: int) -> Optional[int]:
    side = math.isqrt(n) if n >= 0 else -1
    return side if side >= 1 and side * side == n else None


def _compact(t: Tensor) -> Tensor:
    """float32 (what the comparisons and training expect), contiguous, owning exactly its
    storage (so ``torch.save`` does not write the source tensor a slice came from)."""
    t = t.detach()
    if t.is_floating_point() and t.dtype != torch.float32:
        t = t.to(torch.float32)
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _num(x: float) -> Union[int, float]:
    """An int when the float is integral (nicer in configs: mlp_ratio 4, not 4.0)."""
    return int(x) if float(x).is_integer() else float(x)


# --------------------------------------------------------------------------------------------
# timm names -> vitasks names


def _split_prefix_tokens(sd: StateDict, src: Source) -> Tuple[Tuple[int, int], List[str]]:
    """Bring ``pos_embed`` to vitasks' layout (class-token position + grid) and fold the
    positions of the other prefix tokens into them (a token's position embedding is added once,
    at the input, so token + position is the same token without one).

    timm orders prefix tokens class, distillation, registers; some models give every prefix
    token a position, some only the class token, some none (``no_embed_class``). Returns the
    grid and notes.
    """
    notes = []
    pos = sd.pop("pos_embed")
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise CheckpointError(f"{src.path}: pos_embed must be (1, N, C), got {tuple(pos.shape)}")
    has_cls = "cls_token" in sd
    prefix = ["cls"] * has_cls + ["dist"] * ("dist_token" in sd)
    num_reg = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    prefix += ["reg"] * num_reg
    length = pos.shape[1]

    candidates = []
    for p in (len(prefix), len(prefix) - num_reg, int(has_cls), 0):
        if p not in candidates:
            candidates.append(p)
    grid = None
    if src.grid is not None:
        num_pos = next((p for p in candidates if length - p == src.grid[0] * src.grid[1]), None)
        if num_pos is not None:
            grid = src.grid
    if grid is None:
        for p in candidates:
            side = _square_side(length - p)
            if side:
                num_pos, grid = p, (side, side)
                break
    if grid is None:
        raise CheckpointError(
            f"{src.path}: cannot lay pos_embed with {length} entries on a token grid with "
            f"prefix tokens {prefix} (expected a square grid plus 0..{len(prefix)} prefix entries)"
        )

    C = pos.shape[-1]
    cls_pos = torch.zeros(1, 1, C, dtype=pos.dtype)
    reg_rows = []
    for j, kind in enumerate(prefix[:num_pos]):
        row = pos[:, j : j + 1]
        if kind == "cls":
            cls_pos = row
        elif kind == "dist":
            sd["dist_token"] = sd["dist_token"] + row
        else:
            reg_rows.append(row)
    if reg_rows:
        sd["reg_token"] = sd["reg_token"] + torch.cat(reg_rows, dim=1)
    if has_cls and num_pos == 0:
        notes.append("the class token had no position embedding: a zero one was added")

    # Distillation token -> first register token (vitasks puts register tokens right after
    # the class token, as DeiT puts its distillation token).
    if "dist_token" in sd:
        dist = sd.pop("dist_token")
        sd["reg_token"] = torch.cat([dist, sd["reg_token"]], dim=1) if "reg_token" in sd else dist
        notes.append(
            "DeiT distillation token kept as register token 0 (its position embedding folded "
            "in); logits come from the class-token head only"
        )
    grid_pos = pos[:, num_pos:]
    sd["pos_embed"] = torch.cat([cls_pos, grid_pos], dim=1) if has_cls else grid_pos
    return grid, notes


_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
    "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma",
}
_BLOCK_ALIASES = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}  # DeiT III / BEiT names
_TOP_LEVEL = {"cls_token", "reg_token", "pos_embed", "norm.weight", "norm.bias",
              "fc_norm.weight", "fc_norm.bias"}
_HYBRID_RE = re.compile(
    r"^patch_embed\.backbone\.(stem\.(conv|norm)\.(weight|bias)|stages\.\d+\.blocks\.\d+\."
    r"(conv[123]|norm[123]|downsample\.conv|downsample\.norm)\.(weight|bias))$"
)


def _infer_stem(sd: StateDict, src: Source) -> Tuple[Dict[str, Any], int, int]:
    """Stem config, its stride and the image channels, from ``patch_embed.*``."""
    if "patch_embed.proj.weight" not in sd:
        raise CheckpointError(f"{src.path}: no patch embedding (patch_embed.proj.weight) found")
    proj = sd["patch_embed.proj.weight"]
    kh, kw = proj.shape[-2:]
    if kh != kw:
        raise CheckpointError(f"{src.path}: non-square patch embedding kernel {kh}x{kw} is not supported")
    if not any(k.startswith("patch_embed.backbone.") for k in sd):
        return dict(type="PatchEmbed"), kh, proj.shape[1]
    if kh != 1:
        raise CheckpointError(
            f"{src.path}: hybrid projection with a {kh}x{kw} kernel; vitasks' ResNetStem "
            "projects with a 1x1 conv"
        )
    stages = block_indices(sd, "patch_embed.backbone.stages.")
    layers = [len(block_indices(sd, f"patch_embed.backbone.stages.{s}.blocks.")) for s in stages]
    widths = [sd[f"patch_embed.backbone.stages.{s}.blocks.0.conv3.weight"].shape[0] for s in stages]
    root = sd["patch_embed.backbone.stem.conv.weight"]
    stem = dict(type="ResNetStem", layers=layers, widths=widths, stem_channels=root.shape[0])
    stem.update(src.stem)
    return stem, 4 * 2 ** (len(layers) - 1), root.shape[1]


def to_vitasks(src: Source, opts: ConvertOptions) -> Tuple[StateDict, Dict[str, Any]]:
    """Map a timm-named :class:`Source` to a vitasks classifier state dict (``backbone.*`` +
    ``head.*``), applying the fine-tuning options. Returns the state dict and the meta dict."""
    sd = dict(src.state_dict)
    notes = list(src.notes)

    # DeiT III / BEiT layer-scale names -> timm's.
    for k in list(sd):
        m = _BLOCK_RE.match(k)
        if m:
            part = m.group(2)
            for old, new in _BLOCK_ALIASES.items():
                if part == old:
                    sd[f"blocks.{m.group(1)}.{new}"] = sd.pop(k)

    depth_ids = block_indices(sd)
    if not depth_ids or depth_ids != list(range(len(depth_ids))):
        raise CheckpointError(
            f"{src.path}: expected transformer blocks blocks.0 .. blocks.N-1 (a ViT in timm "
            f"naming), found block indices {depth_ids[:10]}"
        )
    required = ["pos_embed", "patch_embed.proj.weight"] + [
        f"blocks.{i}.{part}" for i in depth_ids for part in
        ("norm1.weight", "attn.qkv.weight", "attn.proj.weight", "norm2.weight", "mlp.fc1.weight", "mlp.fc2.weight")
    ]
    missing = [k for k in required if k not in sd]
    if missing:
        raise CheckpointError(f"{src.path}: not a complete ViT: missing {missing[:10]}")
    depth = len(depth_ids)
    stem, stride, in_channels = _infer_stem(sd, src)
    embed_dim = sd["patch_embed.proj.weight"].shape[0]
    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    num_heads = opts.num_heads or src.num_heads
    if num_heads is None:
        num_heads = NUM_HEADS_BY_WIDTH.get(embed_dim, max(embed_dim // 64, 1))
        notes.append(f"num_heads={num_heads} assumed from the width (standard ViT sizes); pass num_heads to override")
    if embed_dim % num_heads:
        raise CheckpointError(f"num_heads={num_heads} does not divide the width {embed_dim}")

    # Heads: the class-token head `head`, DeiT's `head_dist`, the ViT paper's pre-logits layer.
    head = {k[len("head."):]: sd.pop(k) for k in [k for k in sd if k.startswith("head.")]}
    pre_logits = {k[len("pre_logits."):]: sd.pop(k) for k in [k for k in sd if k.startswith("pre_logits.")]}
    if any(k.startswith("head_dist.") for k in sd):
        for k in [k for k in sd if k.startswith("head_dist.")]:
            sd.pop(k)
        notes.append("DeiT distillation head (head_dist) dropped: the class-token head is kept")
    src_classes = head["weight"].shape[0] if "weight" in head else None
    if opts.drop_head and head:
        head = {}
        notes.append("head dropped (drop_head): the new head starts at zero")
    elif opts.num_classes is not None and head and opts.num_classes != src_classes:
        head = {}
        notes.append(
            f"head dropped: {src_classes} classes in the checkpoint, {opts.num_classes} wanted; "
            "the new head starts at zero"
        )
    if pre_logits and not opts.keep_pre_logits:
        if head:
            notes.append(
                "pre-training MLP head (pre_logits + head) dropped as the ViT paper does for "
                "fine-tuning; keep_pre_logits maps it to MLPClsHead instead"
            )
        else:
            notes.append("pre_logits layer dropped (keep_pre_logits keeps it as MLPClsHead.hidden)")
        pre_logits, head = {}, {}
    if set(head) - {"weight", "bias"} or set(pre_logits) - {"fc.weight", "fc.bias"}:
        raise CheckpointError(
            f"{src.path}: unsupported head parameters {sorted(set(head) | set(pre_logits))}; "
            "expected a linear head (head.weight/bias) and optional pre_logits.fc (drop_head "
            "drops the head)"
        )

    # Pooling and the final norm: vitasks has one final norm, either ``norm`` on all tokens
    # before pooling or ``fc_norm`` after it (``final_norm`` says whether either exists).
    class_token = "cls_token" in sd
    has_fc_norm = "fc_norm.weight" in sd
    pool = opts.pool or src.pool or ("mean" if has_fc_norm or not class_token else "token")
    if pool not in _POOLS:
        raise CheckpointError(f"pool must be one of {list(_POOLS)}, got {pool!r}")
    if pool in ("token", "token_mean") and not class_token:
        raise CheckpointError(f"{src.path}: pool={pool!r} needs a class token, and this model has none")
    use_fc_norm = has_fc_norm if src.fc_norm is None else src.fc_norm
    keep_norm = "norm.weight" in sd and src.final_norm is not False
    if keep_norm and use_fc_norm:
        raise CheckpointError(
            f"{src.path}: the model has both a final norm and an fc_norm; vitasks' ViT has one "
            "of them (pass drop_final_norm to drop both)"
        )
    if opts.drop_final_norm:
        if keep_norm or use_fc_norm:
            notes.append("final norm dropped (drop_final_norm)")
        keep_norm = use_fc_norm = False
    if pool == "token_mean" and use_fc_norm:
        raise CheckpointError(
            f"{src.path}: pool='token_mean' (DINOv2's class token + patch mean after the final norm) takes "
            "no fc_norm, and this model has one; pass pool='mean' or 'token'"
        )
    for name, keep in (("norm.", keep_norm), ("fc_norm.", use_fc_norm)):
        if not keep:
            for k in [k for k in sd if k.startswith(name)]:
                sd.pop(k)

    grid, pos_notes = _split_prefix_tokens(sd, src)
    notes += pos_notes
    src_img = (grid[0] * stride, grid[1] * stride)
    img_size = src_img
    if opts.img_size is not None:
        img_size = _pair(opts.img_size, "img_size")
        if img_size[0] % stride or img_size[1] % stride:
            raise CheckpointError(f"img_size {img_size} must be divisible by the stem stride {stride}")
        new_grid = (img_size[0] // stride, img_size[1] // stride)
        if new_grid != grid:
            from vitasks.models.layers.pos_embed import resample_abs_pos_embed

            rule = src.pos_interp
            sd["pos_embed"] = resample_abs_pos_embed(
                sd["pos_embed"], new_grid, grid, num_prefix_tokens=int(class_token),
                mode=rule.get("interpolate_mode", "bicubic"), antialias=rule.get("interpolate_antialias", False),
                offset=rule.get("interpolate_offset", 0.0),
            )
            how = ", ".join(f"{k[len('interpolate_'):]}={v}" for k, v in rule.items()) or "bicubic"
            notes.append(f"position embeddings resampled ({how}) from a {grid[0]}x{grid[1]} to a "
                         f"{new_grid[0]}x{new_grid[1]} grid")

    out: StateDict = {}
    unknown = []
    for k, v in sd.items():
        m = _BLOCK_RE.match(k)
        if k in _TOP_LEVEL or (m and m.group(2) in _BLOCK_PARTS):
            out["backbone." + k] = v
        elif k in ("patch_embed.proj.weight", "patch_embed.proj.bias") or _HYBRID_RE.match(k):
            out["backbone.stem." + k[len("patch_embed."):]] = v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(
            f"{src.path}: {len(unknown)} weights have no counterpart in vitasks' ViT (is this a "
            f"plain ViT / DeiT / MAE / R50 hybrid?): {sorted(unknown)[:10]}"
        )

    head_hint = None
    num_classes = src_classes if head else opts.num_classes
    feat_dim = 2 * embed_dim if pool == "token_mean" else embed_dim
    if head and not pre_logits and head["weight"].ndim == 2 and head["weight"].shape[1] != feat_dim:
        raise CheckpointError(
            f"{src.path}: the head reads {head['weight'].shape[1]} features but pool={pool!r} gives {feat_dim}; "
            "pass the source's pooling (token_mean: class token + patch mean, 2 x width) or drop_head"
        )
    if pre_logits:
        out["head.hidden.weight"], out["head.hidden.bias"] = pre_logits["fc.weight"], pre_logits["fc.bias"]
        head_hint = dict(type="MLPClsHead", num_classes=num_classes, in_channels=embed_dim,
                         hidden_channels=pre_logits["fc.weight"].shape[0])
    if head:
        out.update({"head.fc." + k: v for k, v in head.items()})
    if head_hint is None:
        head_hint = dict(type="LinearClsHead", num_classes=num_classes, in_channels=feat_dim)

    ls = "blocks.0.ls1.gamma" in sd
    hint = dict(
        img_size=img_size[0] if img_size[0] == img_size[1] else list(img_size),
        patch_size=stride,
        in_channels=in_channels,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=_num(mlp_hidden / embed_dim),
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        layer_scale_init_value=1e-5 if ls else None,
        norm_eps=src.norm_eps,
        mlp_act=src.mlp_act,
        class_token=class_token,
        num_reg_tokens=sd["reg_token"].shape[1] if "reg_token" in sd else 0,
        pool=pool,
        fc_norm=use_fc_norm,
        final_norm=keep_norm or use_fc_norm,
        stem=stem,
        **src.pos_interp,
    )
    out = {k: _compact(v) for k, v in out.items()}
    from vitasks.engine.architecture import architecture_from_config

    meta = dict(
        converted_from=src.fmt,
        source=os.path.abspath(src.path),
        config_hint=hint,
        # What the hint builds, read back from the built backbone: loading the checkpoint into
        # a model whose backbone differs in any of it warns (vitasks.engine.checkpoint).
        architecture=architecture_from_config(hint),
        head_hint=head_hint,
        data_preprocessor_hint=src.input_norm,
        source_img_size=list(src_img),
        notes=notes,
    )
    return out, meta


# --------------------------------------------------------------------------------------------
# Saving and describing


def save_converted(state_dict: StateDict, meta: Dict[str, Any], dst: str) -> Dict[str, Any]:
    """Write ``{"state_dict", "meta"}`` with ``torch.save``, or a ``.safetensors`` file whose
    metadata holds the meta as JSON under ``vitasks_meta``. Returns the checkpoint dict."""
    ckpt = {"state_dict": state_dict, "meta": meta}
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    if dst.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.clone() for k, v in state_dict.items()}, dst,
                  metadata={"format": "pt", "vitasks_meta": json.dumps(meta)})
    else:
        torch.save(ckpt, dst)
    return ckpt


#: The base model configs shipped for converted weights, with the backbone values they fix.
SHIPPED_CONFIGS = {
    f"configs/_base_/models/vit_{size}_p{patch}.yaml": dict(
        embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, stem="PatchEmbed")
    for size, dim, depth, heads in (("tiny", 192, 12, 3), ("small", 384, 12, 6),
                                    ("base", 768, 12, 12), ("large", 1024, 24, 16))
    for patch in (16, 32)
}
SHIPPED_CONFIGS["configs/_base_/models/vit_base_r50_s16.yaml"] = dict(
    embed_dim=768, depth=12, num_heads=12, patch_size=16, stem="ResNetStem", layers=[3, 4, 9])


def suggest_config(hint: Dict[str, Any]) -> Optional[str]:
    """The shipped base model config whose backbone the inferred one matches, or None."""
    for path, want in SHIPPED_CONFIGS.items():
        have = dict(embed_dim=hint["embed_dim"], depth=hint["depth"], num_heads=hint["num_heads"],
                    patch_size=hint["patch_size"], stem=hint["stem"]["type"])
        if "layers" in want:
            have["layers"] = list(hint["stem"].get("layers", []))
        if have == want:
            return path
    return None


def describe(meta: Dict[str, Any]) -> str:
    """A human summary of a conversion: the inferred architecture, the matching config and the
    model section to put in a config."""
    import yaml

    h = meta["config_hint"]
    head = meta.get("head_hint") or {}
    config = suggest_config(h)
    section = {"model": {"backbone": {"type": "VisionTransformer", **h}, "head": head}}
    if meta.get("data_preprocessor_hint"):
        section["model"] = {"data_preprocessor": meta["data_preprocessor_hint"], **section["model"]}
    lines = [
        f"converted {meta['converted_from']} checkpoint {meta['source']}",
        f"  architecture: VisionTransformer embed_dim={h['embed_dim']} depth={h['depth']} "
        f"num_heads={h['num_heads']} patch_size={h['patch_size']} img_size={h['img_size']} "
        f"stem={h['stem']['type']} pool={h['pool']} mlp_act={h.get('mlp_act', 'gelu')}; head {head.get('type')} "
        f"num_classes={head.get('num_classes')}",
        "  matching base config: " + (config or "none shipped; start from "
                                      "configs/_base_/models/vit_base_p16.yaml"),
        "  set these in the config (norm_eps, mlp_act, pool, norms and the stem's epsilons matter "
        "for exact outputs; the checkpoint records them, and loading it into a backbone that "
        "differs warns, naming each):",
    ]
    lines += ["    " + line for line in yaml.safe_dump(section, sort_keys=False, default_flow_style=None).rstrip().splitlines()]
    lines += [f"  note: {n}" for n in meta.get("notes", [])]
    return "\n".join(lines)
