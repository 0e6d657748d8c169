"""timm ViT, DeiT and R50-hybrid state dicts (``.pth`` / ``.bin`` / ``.safetensors``).

timm's names are the intermediate naming of :mod:`vitasks.convert.common`, so this only reads
the file and states timm's conventions: LayerNorm eps 1e-6; in the hybrid
(``vit_base_r50_s16_*``), weight standardisation with eps 1e-8 (added to the variance),
GroupNorm eps 1e-5 and TensorFlow SAME padding, which vitasks' ``ResNetStem`` implements.

DINOv2 (:mod:`vitasks.convert.dinov2`): timm's ``vit_{small,base,large}_patch14_dinov2`` and
``*_reg4_dinov2`` state dicts (patch 14 with LayerScale; registers without position embeddings,
the class token's folded in) and facebookresearch/dinov2's own ``dinov2_vit*14*_pretrain.pth``
files (``register_tokens``, ``mask_token``) are read too; the converted backbone records the
source's position-embedding resampling rule (timm: bicubic with antialiasing to the target size;
facebookresearch: offset 0.1 without antialiasing, or antialiasing without offset for the
register models) and pools ``token_mean`` (DINOv2's linear evaluation) unless a head reads one
token.
"""

from vitasks.convert import dinov2
from vitasks.convert.common import ConvertOptions, Source, StateDict, read_torch_state_dict
from vitasks.errors import CheckpointError

#: timm's ViT hybrid: ``StdConv2dSame(eps=1e-8)`` and ``GroupNormAct`` (eps 1e-5), 32 groups.
TIMM_HYBRID_STEM = dict(num_groups=32, ws_eps=1e-8, gn_eps=1e-5)


def _is_timm_dinov2(sd: StateDict) -> bool:
    """timm's DINOv2 family: a 14 x 14 patch embedding with LayerScale (``ls1.gamma``)."""
    proj = sd.get("patch_embed.proj.weight")
    return proj is not None and proj.ndim == 4 and tuple(proj.shape[-2:]) == (14, 14) and "blocks.0.ls1.gamma" in sd


def _dinov2(src: Source, opts: ConvertOptions, kind: str, name: str) -> Source:
    sd = src.state_dict
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] != fc2.shape[1]:
        # timm's SwiGLUPacked: fc1 gives 2 x the hidden width that fc2 reads.
        raise CheckpointError(f"{src.path}: {dinov2.SWIGLU_MESSAGE}")
    rule = dinov2.RULES[kind + ("_reg" if kind == "facebook" and "reg_token" in sd else "")]
    src.pos_interp = dict(rule)
    src.input_norm = dict(dinov2.DINOV2_NORM)
    src.pool = dinov2.pool_for(sd, sd["patch_embed.proj.weight"].shape[0])
    src.notes += [dinov2.rule_note(rule, name), dinov2.pool_note(opts.pool or src.pool), dinov2.CONFIG_NOTE]
    return src


def read(path: str, opts: ConvertOptions) -> Source:
    """A timm checkpoint (plain state dict, or under ``state_dict`` / ``model``)."""
    sd = read_torch_state_dict(path)
    if dinov2.is_facebook_dinov2(sd):
        src = Source(fmt="timm", path=path, state_dict=dinov2.from_facebook(sd, path), norm_eps=dinov2.DINOV2_EPS)
        return _dinov2(src, opts, "facebook", "facebookresearch/dinov2")
    src = Source(fmt="timm", path=path, state_dict=sd, norm_eps=1e-6, stem=dict(TIMM_HYBRID_STEM))
    if _is_timm_dinov2(sd):
        return _dinov2(src, opts, "timm", "timm (dynamic_img_size, or loading at another img_size)")
    return src
