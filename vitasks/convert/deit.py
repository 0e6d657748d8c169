"""DeiT / DeiT III checkpoints as facebookresearch/deit releases them: ``{"model": state_dict}``
in timm naming (LayerNorm eps 1e-6).

- Distilled models (``dist_token``, ``head_dist``): the distillation token becomes vitasks'
  register token 0 with its position embedding folded in, so the features are exactly DeiT's;
  the class-token head is kept and ``head_dist`` dropped. The logits are therefore those of
  DeiT's class head, not the average of both heads DeiT reports at test time (vitasks heads read
  one pooled vector).
- DeiT III (``gamma_1`` / ``gamma_2`` layer scale, position embeddings for the patches only):
  layer scale maps to ``ls1.gamma`` / ``ls2.gamma``; the class token gets a zero position
  embedding, which is the same model.
"""

from vitasks.convert.common import IMAGENET_NORM, ConvertOptions, Source, read_torch_state_dict


def read(path: str, opts: ConvertOptions) -> Source:
    """A DeiT checkpoint (``model`` dict, or a plain state dict)."""
    sd = read_torch_state_dict(path, prefer=("model", "state_dict", "module"))
    return Source(fmt="deit", path=path, state_dict=sd, norm_eps=1e-6, input_norm=dict(IMAGENET_NORM))
