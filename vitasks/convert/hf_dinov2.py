"""Hugging Face transformers DINOv2: ``Dinov2Model``, ``Dinov2ForImageClassification``,
``Dinov2Backbone``, ``Dinov2WithRegistersModel`` and ``Dinov2WithRegistersForImageClassification``.

Names read: the hub's (``embeddings.patch_embeddings.projection``,
``encoder.layer.{i}.attention.attention.{query,key,value}``, ``attention.output.dense``,
``layer_scale{1,2}.lambda1``, ``norm{1,2}``, ``mlp.fc{1,2}``, ``layernorm``) and transformers 5's
module names (``attention.{q,k,v,o}_proj``), under ``dinov2.`` / ``dinov2_with_registers.`` or
no prefix; ``classifier`` (2 x width inputs: class token + patch mean) becomes the head.
``embeddings.mask_token`` is dropped. ``config.json`` gives the heads, the LayerNorm epsilon
(``Dinov2Config``'s default 1e-6 without it), the register count and the SwiGLU flag.

Conventions recorded (see :mod:`vitasks.convert.dinov2`): transformers resamples the position
embeddings bicubically to the target size, with antialiasing in the with-registers model
only; the pooling is ``token_mean``, which is what ``Dinov2ForImageClassification`` classifies.
"""

from typing import Any, Dict

from vitasks.convert import dinov2
from vitasks.convert.common import HF_LAYER_PARTS, HF_LAYER_RE, HF_TOP_TIMM, ConvertOptions, HFEncoderNames, Source, StateDict
from vitasks.errors import CheckpointError

_PREFIXES = ("dinov2_with_registers.", "dinov2.")
_TOP = {**HF_TOP_TIMM, "embeddings.register_tokens": "reg_token"}
_LAYER = {
    "norm1": "norm1",
    "norm2": "norm2",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    **HF_LAYER_PARTS,
}
_SWIGLU = ("mlp.weights_in", "mlp.weights_out", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def detect(sd: StateDict, cfg: Dict[str, Any]) -> bool:
    """A transformers DINOv2 (by its config's ``model_type`` or its LayerScale names)."""
    if str(cfg.get("model_type", "")).startswith("dinov2"):
        return True
    return any(k.endswith("layer_scale1.lambda1") for k in sd)


def to_timm(sd: StateDict, where: str) -> StateDict:
    """transformers DINOv2 names -> timm's (q, k, v fused into qkv)."""
    prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in sd)), "")
    names = HFEncoderNames(_TOP, _LAYER)
    for key, v in sd.items():
        k = key[len(prefix):]
        layer = HF_LAYER_RE.match(k)
        if key.startswith(prefix) and layer and layer.group(2).startswith(_SWIGLU):
            raise CheckpointError(f"{where}: {dinov2.SWIGLU_MESSAGE}")
        if key in ("classifier.weight", "classifier.bias"):
            names.out["head." + key.split(".")[1]] = v
        elif not key.startswith(prefix) or not (k == "embeddings.mask_token" or names.place(k, v)):
            names.unknown.append(key)
    return names.result(where, "DINOv2", f"{prefix or ''}embeddings.*, {prefix or ''}encoder.layer.*, layernorm, "
                        "classifier")


def read(sd: StateDict, cfg: Dict[str, Any], path: str, opts: ConvertOptions) -> Source:
    """A transformers DINOv2 state dict (and its ``config.json``, possibly empty) -> Source."""
    from vitasks.convert.hf import apply_config  # hf reads the files and dispatches here

    if cfg.get("use_swiglu_ffn"):
        raise CheckpointError(f"{path}: config.json says use_swiglu_ffn: {dinov2.SWIGLU_MESSAGE}")
    state = to_timm(sd, path)
    num_reg = state["reg_token"].shape[1] if "reg_token" in state else 0
    if "num_register_tokens" in cfg and int(cfg["num_register_tokens"]) != num_reg:
        raise CheckpointError(
            f"{path}: config.json says num_register_tokens {cfg['num_register_tokens']} but the weights have {num_reg}"
        )
    with_registers = num_reg > 0 or str(cfg.get("model_type", "")) == "dinov2_with_registers"
    rule = dinov2.RULES["hf_reg" if with_registers else "hf"]
    src = Source(fmt="hf", path=path, state_dict=state, pos_interp=dict(rule), input_norm=dict(dinov2.DINOV2_NORM))
    apply_config(src, cfg, dinov2.DINOV2_EPS, "Dinov2Config")
    embed_dim = state["patch_embed.proj.weight"].shape[0] if "patch_embed.proj.weight" in state else 0
    src.pool = dinov2.pool_for(state, embed_dim)
    name = "transformers' Dinov2WithRegisters" if with_registers else "transformers' Dinov2"
    src.notes += [dinov2.rule_note(rule, name), dinov2.pool_note(opts.pool or src.pool), dinov2.CONFIG_NOTE]
    return src
