"""What every DINOv2 source shares (Oquab et al. 2023; with registers: Darcet et al. 2024).

DINOv2 is vitasks' ViT with patch 14, LayerScale, LayerNorm eps 1e-6, exact GELU, a class token
with a position embedding and (``*_reg*``) register tokens without one, placed after the class
token and before the patches. The sources differ in two things the weights don't say:

* How the 37 x 37 (518 px) position embeddings are resampled for other input sizes. Each rule
  is recorded as backbone options in the converted checkpoint's config hint
  (:data:`RULES`), so vitasks' features at 224 px equal those of the source it came from:

  ==============================  ========  =========  ===========================
  source                          mode      antialias  offset
  ==============================  ========  =========  ===========================
  facebookresearch, no registers  bicubic   no         0.1 (scale-factor kludge)
  facebookresearch, registers     bicubic   yes        0
  transformers ``Dinov2*``        bicubic   no         0 (since 4.4x; 0.1 before)
  transformers ``...WithRegisters``  bicubic  yes      0
  timm ``*_dinov2`` (both)        bicubic   yes        0
  ==============================  ========  =========  ===========================

* The pooling. DINOv2's linear evaluation, and transformers' ``Dinov2ForImageClassification``,
  classify the class token concatenated with the mean of the patch tokens (registers
  excluded) after the final norm: vitasks' ``pool="token_mean"``, with a ``LinearClsHead`` of
  2 x width inputs. A converted DINOv2 gets that pooling unless its head reads one token.

The SwiGLU MLP of ViT-g/14 (``use_swiglu_ffn``, ``mlp.w12``/``w3``, ``weights_in``/``out``) has
no counterpart in vitasks' blocks: those checkpoints are refused with a message.
"""

import re
from typing import Any, Dict, Optional

from vitasks.convert.common import StateDict
from vitasks.errors import CheckpointError


def _rule(antialias: bool, offset: float) -> Dict[str, Any]:
    return dict(interpolate_mode="bicubic", interpolate_antialias=antialias, interpolate_offset=offset)


#: Position-embedding resampling rule of each source, as ``VisionTransformer`` options.
RULES: Dict[str, Dict[str, Any]] = {
    "facebook": _rule(False, 0.1),
    "facebook_reg": _rule(True, 0.0),
    "hf": _rule(False, 0.0),
    "hf_reg": _rule(True, 0.0),
    "timm": _rule(True, 0.0),
}

#: LayerNorm epsilon of every DINOv2 (and transformers' ``Dinov2Config`` default).
DINOV2_EPS = 1e-6

#: DINOv2's input normalisation (ImageNet statistics, 0-255 RGB).
DINOV2_NORM = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])

SWIGLU_MESSAGE = (
    "a SwiGLU MLP (DINOv2 ViT-g/14): vitasks' transformer blocks have the two-layer GELU MLP only; "
    "the ViT-S/B/L DINOv2 models convert"
)


def pool_for(sd: StateDict, embed_dim: int) -> str:
    """DINOv2's pooling for a timm-named state dict: ``token_mean`` unless a head reads one
    token's width (a model fine-tuned with class-token pooling)."""
    head = sd.get("head.weight")
    if head is not None and head.ndim == 2 and head.shape[1] == embed_dim:
        return "token"
    return "token_mean"


def is_facebook_dinov2(sd: StateDict) -> bool:
    """A state dict as facebookresearch/dinov2 saves it (``dinov2_vit*14*_pretrain.pth``): its
    ``register_tokens``, or its (1, C) ``mask_token`` beside a patch-14 embedding (MAE's mask
    token is (1, 1, C) and comes with a decoder)."""
    if "register_tokens" in sd:
        return True
    mask, proj = sd.get("mask_token"), sd.get("patch_embed.proj.weight")
    return (
        mask is not None and mask.ndim == 2 and proj is not None and proj.ndim == 4
        and tuple(proj.shape[-2:]) == (14, 14)
    )


def from_facebook(sd: StateDict, where: str) -> StateDict:
    """facebookresearch/dinov2 names -> timm's: ``register_tokens`` -> ``reg_token``,
    ``mask_token`` (iBOT's masked-patch token, unused at inference) dropped. Everything else
    already has timm's names (``blocks.{i}.ls1.gamma``, ``attn.qkv``, ``norm``)."""
    if any(".mlp.w12." in k or ".mlp.w3." in k for k in sd):
        raise CheckpointError(f"{where}: {SWIGLU_MESSAGE}")
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd):
        raise CheckpointError(
            f"{where}: chunked blocks (blocks.<chunk>.<i>.*, block_chunks > 0); save the model with "
            "block_chunks=0 (torch.hub's models are) and convert that"
        )
    out = {k: v for k, v in sd.items() if k != "mask_token"}
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
    return out


def rule_note(rule: Dict[str, Any], source: str) -> str:
    return (
        f"position embeddings resample as {source} does at other input sizes: bicubic, "
        f"antialias={rule['interpolate_antialias']}, offset={rule['interpolate_offset']} "
        "(interpolate_* in the config hint)"
    )


CONFIG_NOTE = (
    "DINOv2 configs: configs/cls_dinov2_vitb14.yaml (linear probe on the frozen backbone) and the backbone "
    "base configs/_base_/models/vit_b14_dinov2.yaml (ViT-B/14; S/L: embed_dim 384/1024, depth 12/24, "
    "num_heads 6/16); copy the interpolate_* and num_reg_tokens above into them"
)


def pool_note(pool: Optional[str]) -> str:
    if pool == "token_mean":
        return ("pool token_mean: class token + mean of the patch tokens (registers excluded), DINOv2's linear "
                "evaluation and Dinov2ForImageClassification; pool='token' gives the class token alone")
    return f"pool {pool}"
