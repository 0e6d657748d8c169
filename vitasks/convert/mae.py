"""MAE checkpoints (facebookresearch/mae): ``{"model": state_dict}`` in timm naming, eps 1e-6.

- Pre-training checkpoints: the decoder (``decoder_*``) and ``mask_token`` are dropped. MAE
  fine-tunes with global pooling: the mean of the patch tokens goes through a new ``fc_norm``
  and the encoder's final ``norm`` is removed. So by default (``pool=None`` or ``"mean"``) the
  converted model has ``pool="mean"``, ``fc_norm=True`` (fresh, as MAE starts it) and
  ``final_norm=False``, with ``norm`` dropped; ``pool="token"`` keeps ``norm`` and the class
  token instead (MAE's linear-probing setting).
- Fine-tuned checkpoints (``fc_norm`` + ``head``, no ``norm``): converted as they are, and give
  MAE's logits.
- MAE checkpoints have no relative position tables: a backbone with ``use_rel_pos_bias`` (MAE's
  segmentation fine-tuning) starts them at zero, as MAE does.

BEiT's own checkpoints (microsoft/unilm ``beit/``, the same timm-like naming; pre-trained or
fine-tuned) read here too: ``blocks.i.attn.q_bias`` / ``v_bias`` become the fused ``qkv`` bias
(zero key part), ``gamma_1`` / ``gamma_2`` LayerScale, ``blocks.i.attn.relative_position_bias_table``
``blocks.i.attn.rel_pos_bias.table`` (``use_rel_pos_bias``), a shared
``rel_pos_bias.relative_position_bias_table`` ``rel_pos_bias.table`` (``use_shared_rel_pos_bias``;
it loads into every block of a ``use_rel_pos_bias`` model, as BEiT's fine-tuning copies it); the
pre-training ``lm_head`` and ``mask_token`` are dropped, and without absolute position embeddings
(``use_abs_pos_emb=False``) a zero ``pos_embed`` is written. With ``img_size`` (fine-tuning at
another resolution) the tables are resampled as BEiT's fine-tuning does when it loads them
(:func:`~vitasks.models.layers.rel_pos_bias.resize_rel_pos_bias_table_geometric`; needs scipy).
"""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import torch

from vitasks.convert.common import (
    IMAGENET_NORM, ConvertOptions, Source, StateDict, _compact, describe, read_torch_state_dict, to_vitasks,
)

_PRETRAIN_ONLY = ("decoder_", "mask_token", "lm_head.")
_TABLE_RE = re.compile(r"^blocks\.(\d+)\.attn\.relative_position_bias_table$")
_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


@dataclass
class RelPosSource(Source):
    """A timm-named source with BEiT's relative position tables (``tables``: vitasks names
    without ``backbone.``), mapped by :func:`to_vitasks` plus the tables."""

    tables: StateDict = field(default_factory=dict)

    def to_vitasks(self, opts: ConvertOptions) -> Tuple[StateDict, Dict[str, Any]]:
        from vitasks.engine.architecture import architecture_from_config
        from vitasks.models.layers.rel_pos_bias import resize_rel_pos_bias_table, resize_rel_pos_bias_table_geometric

        out, meta = to_vitasks(self, opts)
        hint = meta["config_hint"]
        hint["use_rel_pos_bias"] = any(k.startswith("blocks.") for k in self.tables)
        hint["use_shared_rel_pos_bias"] = "rel_pos_bias.table" in self.tables
        if any(k.startswith("blocks.0.ls1") for k in self.state_dict):
            hint["layer_scale_init_value"] = 0.1  # BEiT's fine-tuning value (the weights replace it)
        size = hint["img_size"]
        grid = (size, size) if isinstance(size, int) else tuple(size)
        grid = (grid[0] // hint["patch_size"], grid[1] // hint["patch_size"])
        resized = False
        for k, v in self.tables.items():
            # At the converted grid (img_size) by BEiT's fine-tuning rule (geometric offsets,
            # bicubic spline), not the bilinear rule the backbone applies to other grids.
            try:
                new = resize_rel_pos_bias_table_geometric(v, grid)
            except (ImportError, ValueError):  # no scipy, or not square: the backbone's bilinear rule
                new = resize_rel_pos_bias_table(v, grid)
            resized = resized or new.shape != v.shape
            out["backbone." + k] = _compact(new)
        if resized:
            meta["notes"].append(
                f"relative position tables resampled to the {grid[0]}x{grid[1]} grid by BEiT's fine-tuning rule "
                "(geometric offsets, bicubic spline)"
            )
        meta["architecture"] = architecture_from_config(hint)
        return out, meta

    def describe(self, meta: Dict[str, Any]) -> str:
        return describe(meta)


def _beit_names(sd: StateDict, src_notes) -> Tuple[StateDict, StateDict]:
    """Fuse BEiT's q/v biases into qkv, take the tables out; returns (state dict, tables)."""
    tables: StateDict = {}
    for k in [k for k in sd if k.endswith("relative_position_index")]:
        sd.pop(k)
    for k in list(sd):
        m = _TABLE_RE.match(k)
        if m:
            tables[f"blocks.{m.group(1)}.attn.rel_pos_bias.table"] = sd.pop(k)
    if _SHARED_TABLE in sd:
        tables["rel_pos_bias.table"] = sd.pop(_SHARED_TABLE)
    fused = 0
    for k in [k for k in sd if k.endswith(".attn.q_bias")]:
        base = k[: -len("q_bias")]
        q, v = sd.pop(k), sd.pop(base + "v_bias")
        sd[base + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        fused += 1
    if fused:
        src_notes.append("BEiT's q_bias / v_bias fused into the qkv bias (zero key part)")
    if tables and "pos_embed" not in sd and "cls_token" in sd:
        table = next(iter(tables.values()))
        side = (int(round((table.shape[0] - 3) ** 0.5)) + 1) // 2
        sd["pos_embed"] = torch.zeros(1, 1 + side * side, sd["cls_token"].shape[-1])
        src_notes.append("no absolute position embeddings (BEiT): pos_embed is zero")
    return sd, tables


def read(path: str, opts: ConvertOptions) -> Source:
    """An MAE checkpoint (``model`` dict, or a plain state dict), or one of BEiT's."""
    sd = read_torch_state_dict(path, prefer=("model", "state_dict", "module"))
    dropped = [k for k in sd if k.startswith(_PRETRAIN_ONLY)]
    for k in dropped:
        sd.pop(k)
    notes = []
    sd, tables = _beit_names(sd, notes)
    cls = RelPosSource if tables else Source
    src = cls(fmt="mae", path=path, state_dict=sd, norm_eps=1e-6, input_norm=dict(IMAGENET_NORM), notes=notes)
    if tables:
        src.tables = tables
        src.num_heads = int(next(iter(tables.values())).shape[1])  # a table has one column per head
        src.notes.append(
            "BEiT relative position tables kept: " + ("one shared table (use_shared_rel_pos_bias; it loads into "
                                                      "every block with use_rel_pos_bias)" if "rel_pos_bias.table" in tables
                                                      else "one per block (use_rel_pos_bias)")
        )
    if dropped:
        src.notes.append(f"pre-training decoder / lm_head and mask token dropped ({len(dropped)} tensors)")
    pretrain = "fc_norm.weight" not in sd and not any(k.startswith("head.") for k in sd)
    if pretrain and opts.pool in (None, "mean"):
        src.pool, src.fc_norm, src.final_norm = "mean", True, False
        src.notes.append(
            "MAE global-pool fine-tuning: norm dropped, fc_norm after mean pooling starts fresh "
            "(pass pool='token' to keep norm and pool the class token)"
        )
    return src
