"""Checkpoint converters: timm, Hugging Face, Google .npz, MAE and DeiT weights -> vitasks; and
whole released detectors and segmentors: detectron2 and mmdetection ViTDet, mmsegmentation
UperNet (``detectron2``, ``mmdet``, ``mmseg``: :mod:`vitasks.convert.dense`).

``convert_checkpoint(fmt, src, dst)`` reads a checkpoint safely (safetensors,
``torch.load(weights_only=True)`` through :func:`vitasks.engine.checkpoint.load_state_dict_file`,
or ``np.load(allow_pickle=False)``), renames it to a vitasks classifier state dict
(``backbone.*`` + ``head.*``: loadable by ``ImageClassifier``, and by any task model for the
backbone part), applies the fine-tuning edits the ViT paper uses, and saves
``{"state_dict": ..., "meta": {"converted_from", "source", "config_hint", "architecture",
"head_hint", ...}}`` (``torch.save``; or ``.safetensors`` with the meta as JSON metadata
``vitasks_meta``). ``meta["config_hint"]`` is the ``VisionTransformer`` arguments that give the
source model's outputs; the command prints them as a config section, with the matching
``configs/_base_/models/vit_*.yaml``. ``meta["architecture"]`` records the settings of that
backbone that change outputs (:mod:`vitasks.engine.architecture`): loading the checkpoint into a
model whose backbone differs in any of them (``load_from``, ``init_model``, ``tools/test.py``)
warns once, naming each setting and both values.

Every source module translates into timm's naming (:mod:`vitasks.convert.common`); the shared
code does the rest. Conventions each source fixes:

===========  ====================================================================================
``timm``     LayerNorm eps 1e-6; pooling from the keys (``fc_norm`` -> mean pooling + fc_norm;
             no class token -> mean); R50 hybrid: ``ResNetStem`` with ws_eps 1e-8, GroupNorm eps
             1e-5, SAME padding; ``patch_embed.backbone.*`` -> ``stem.backbone.*``.
``deit``     as timm; distilled models: ``dist_token`` -> register token 0 (position folded in),
             ``head_dist`` dropped (logits = DeiT's class-token head, not the two-head average);
             DeiT III ``gamma_1/2`` -> LayerScale, zero class-token position.
``mae``      eps 1e-6; decoder and mask token dropped; pre-training weights -> global pooling
             with a fresh ``fc_norm`` and no ``norm`` (MAE fine-tuning), or ``pool="token"``.
``hf``       ``layer_norm_eps`` from ``config.json`` (HF default 1e-12); q/k/v fused; class
             token pooled; ``pooler`` = pre-logits; DeiT's distillation token as for ``deit``.
``npz``      flax eps 1e-6 (LayerNorm and GroupNorm); JAX's tanh GELU (``mlp_act: gelu_tanh``);
             hybrid weight standardisation (w - mean) / (std + 1e-5) (``ws_form: std``,
             ``ws_eps: 1e-5``); heads from the kernel shapes; ``gap`` models -> mean pooling
             after the encoder norm; ``pre_logits`` dropped with the head (or kept as
             ``MLPClsHead``). Outputs match the JAX model to float32 rounding.
===========  ====================================================================================

Fine-tuning: ``num_classes`` different from the checkpoint's (or ``drop_head``) drops the head,
so the model's zero-initialised head is what training starts from; ``img_size`` resamples the
position embeddings (bicubic, 2D, class-token position kept), exactly what the backbone would do
at load time; ``drop_final_norm`` removes the final norm. Command line:
``python tools/convert_checkpoint.py FORMAT IN OUT`` or ``vitasks convert FORMAT IN OUT``.
"""

from typing import Any, Callable, Dict, Optional, Tuple, Union

from vitasks.convert import deit, detectron2, hf, mae, mmdet, mmseg, npz, timm
from vitasks.convert.common import ConvertOptions, Source, describe, save_converted, to_vitasks
from vitasks.errors import CheckpointError

#: Format name -> reader ``(path, ConvertOptions) -> Source`` (a timm-named state dict).
CONVERTERS: Dict[str, Callable[[str, ConvertOptions], Source]] = {
    "timm": timm.read,
    "hf": hf.read,
    "npz": npz.read,
    "mae": mae.read,
    "deit": deit.read,
}

#: Whole detectors and segmentors (:mod:`vitasks.convert.dense`): format -> reader
#: ``(path, ConvertOptions) -> DenseSource`` (vitasks-named weights of the full task model).
DENSE_CONVERTERS: Dict[str, Callable[[str, ConvertOptions], Any]] = {
    "detectron2": detectron2.read,
    "mmdet": mmdet.read,
    "mmseg": mmseg.read,
}

#: Every format ``convert_checkpoint`` reads.
FORMATS = tuple(CONVERTERS) + tuple(DENSE_CONVERTERS)


def convert_checkpoint(
    fmt: str,
    src: str,
    dst: Optional[str],
    *,
    img_size: Optional[Union[int, Tuple[int, int]]] = None,
    num_classes: Optional[int] = None,
    drop_head: bool = False,
    drop_final_norm: bool = False,
    pool: Optional[str] = None,
    num_heads: Optional[int] = None,
    keep_pre_logits: bool = False,
    verbose: bool = True,
) -> Dict[str, Any]:
    """Convert checkpoint ``src`` of format ``fmt`` into a vitasks checkpoint at ``dst``.

    Args:
        fmt: one of :data:`FORMATS` (``timm``, ``hf``, ``npz``, ``mae``, ``deit``; whole models:
            ``detectron2``, ``mmdet``, ``mmseg``, which take none of the fine-tuning options).
        src: the source file (for ``hf`` also a folder with ``config.json``).
        dst: output path; ``.safetensors`` writes safetensors (meta as JSON metadata under
            ``vitasks_meta``), anything else ``torch.save``. None: convert without saving.
        img_size: fine-tuning resolution (int or (h, w)); the position embeddings are resampled
            in 2D (bicubic, class-token position kept) when the token grid changes.
        num_classes: classes of the target task; when it differs from the checkpoint's head
            the head is dropped (the model's new head then starts at zero, as in the ViT paper).
        drop_head: drop the classification head whatever the class count.
        drop_final_norm: drop the final LayerNorm ``norm`` (config hint ``final_norm=False``).
        pool: ``"token"`` or ``"mean"`` to override the pooling the source uses.
        num_heads: attention heads when the source does not record them (timm/DeiT/MAE files
            of non-standard widths).
        keep_pre_logits: keep a pre-training ``pre_logits`` (Linear + tanh) layer as
            ``MLPClsHead.hidden`` (with the head as ``head.fc`` unless dropped) instead of
            dropping the whole pre-training head, as the ViT paper's fine-tuning does.
        verbose: print the inferred architecture and notes.

    Returns:
        The checkpoint dict ``{"state_dict": ..., "meta": ...}``; ``meta["config_hint"]`` holds
        the inferred ``VisionTransformer`` arguments, ``meta["head_hint"]`` the head's.

    Raises:
        CheckpointError: unknown format, unreadable or unsafe file, or weights that are not a
            supported ViT.
    """
    if fmt not in CONVERTERS and fmt not in DENSE_CONVERTERS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {sorted(FORMATS)}")
    for name, value in (("num_classes", num_classes), ("num_heads", num_heads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointError(f"{name} must be a positive integer, got {value!r}")
    opts = ConvertOptions(
        img_size=img_size, num_classes=num_classes, drop_head=drop_head,
        drop_final_norm=drop_final_norm, pool=pool, num_heads=num_heads,
        keep_pre_logits=keep_pre_logits,
    )
    if fmt in DENSE_CONVERTERS:
        changed = [k for k, v in vars(opts).items() if v not in (None, False)]
        if changed:
            raise CheckpointError(
                f"{fmt}: converts a whole model as it is; the options {changed} are for backbone "
                "checkpoints (fine-tune from the converted model with the config instead)"
            )
    source = (DENSE_CONVERTERS.get(fmt) or CONVERTERS[fmt])(str(src), opts)
    # A video source (hf: TimeSformer, VideoMAE, ViViT; vitasks.convert.hf_video) maps itself.
    own_mapping = getattr(source, "to_vitasks", None)
    state_dict, meta = own_mapping(opts) if own_mapping else to_vitasks(source, opts)
    if dst is not None:
        meta["output"] = str(dst)
        ckpt = save_converted(state_dict, meta, str(dst))
    else:
        ckpt = {"state_dict": state_dict, "meta": meta}
    if verbose:
        print(source.describe(meta) if own_mapping else describe(meta))
    return ckpt


__all__ = ["CONVERTERS", "DENSE_CONVERTERS", "FORMATS", "ConvertOptions", "Source", "convert_checkpoint", "describe"]
