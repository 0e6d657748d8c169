"""MAE checkpoints (facebookresearch/mae): ``{"model": state_dict}`` in timm naming, eps 1e-6.

- Pre-training checkpoints: the decoder (``decoder_*``) and ``mask_token`` are dropped. MAE
  fine-tunes with global pooling: the mean of the patch tokens goes through a new ``fc_norm``
  and the encoder's final ``norm`` is removed. So by default (``pool=None`` or ``"mean"``) the
  converted model has ``pool="mean"``, ``fc_norm=True`` (fresh, as MAE starts it) and
  ``final_norm=False``, with ``norm`` dropped; ``pool="token"`` keeps ``norm`` and the class
  token instead (MAE's linear-probing setting).
- Fine-tuned checkpoints (``fc_norm`` + ``head``, no ``norm``): converted as they are, and give
  MAE's logits.
"""

from vitasks.convert.common import IMAGENET_NORM, ConvertOptions, Source, read_torch_state_dict

_PRETRAIN_ONLY = ("decoder_", "mask_token")


def read(path: str, opts: ConvertOptions) -> Source:
    """An MAE checkpoint (``model`` dict, or a plain state dict)."""
    sd = read_torch_state_dict(path, prefer=("model", "state_dict", "module"))
    dropped = [k for k in sd if k.startswith(_PRETRAIN_ONLY)]
    for k in dropped:
        sd.pop(k)
    src = Source(fmt="mae", path=path, state_dict=sd, norm_eps=1e-6, input_norm=dict(IMAGENET_NORM))
    if dropped:
        src.notes.append(f"MAE decoder and mask token dropped ({len(dropped)} tensors)")
    pretrain = "fc_norm.weight" not in sd and not any(k.startswith("head.") for k in sd)
    if pretrain and opts.pool in (None, "mean"):
        src.pool, src.fc_norm, src.final_norm = "mean", True, False
        src.notes.append(
            "MAE global-pool fine-tuning: norm dropped, fc_norm after mean pooling starts fresh "
            "(pass pool='token' to keep norm and pool the class token)"
        )
    return src
