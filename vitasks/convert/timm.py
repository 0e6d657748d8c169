"""timm ViT, DeiT and R50-hybrid state dicts (``.pth`` / ``.bin`` / ``.safetensors``).

timm's names are the intermediate naming of :mod:`vitasks.convert.common`, so this only reads
the file and states timm's conventions: LayerNorm eps 1e-6; in the hybrid
(``vit_base_r50_s16_*``), weight standardisation with eps 1e-8 (added to the variance),
GroupNorm eps 1e-5 and TensorFlow SAME padding, which vitasks' ``ResNetStem`` implements.
"""

from vitasks.convert.common import ConvertOptions, Source, read_torch_state_dict

#: timm's ViT hybrid: ``StdConv2dSame(eps=1e-8)`` and ``GroupNormAct`` (eps 1e-5), 32 groups.
TIMM_HYBRID_STEM = dict(num_groups=32, ws_eps=1e-8, gn_eps=1e-5)


def read(path: str, opts: ConvertOptions) -> Source:
    """A timm checkpoint (plain state dict, or under ``state_dict`` / ``model``)."""
    sd = read_torch_state_dict(path)
    return Source(fmt="timm", path=path, state_dict=sd, norm_eps=1e-6, stem=dict(TIMM_HYBRID_STEM))
