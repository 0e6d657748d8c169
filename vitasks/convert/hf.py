"""Hugging Face transformers ViT (``ViTModel``, ``ViTForImageClassification``) and DeiT
(``DeiTModel``, ``DeiTForImageClassification[WithTeacher]``) checkpoints.

Input: a ``.safetensors`` / ``.bin`` file, or a folder holding ``model.safetensors`` or
``pytorch_model.bin`` (or their sharded ``*.index.json``) and ``config.json``. The config gives
``layer_norm_eps`` (HF's default 1e-12, not timm's 1e-6), the heads, the image and patch size;
without it the weights give everything but the heads and HF's default eps is assumed.

Both the names on the hub (``vit.encoder.layer.{i}.attention.attention.query``, ...,
``intermediate.dense``, ``output.dense``) and the names of transformers 5 modules
(``vit.layers.{i}.attention.q_proj``, ``mlp.fc1``, ...) are read. Separate query/key/value
projections are concatenated into the fused ``qkv`` (rows q, k, v: the order the fused
projection is split in). ``pooler.dense`` (ViTModel's tanh pooler, the ViT paper's pre-logits)
is handled as ``pre_logits``; ``mask_token`` is dropped.
"""

import glob
import json
import os
from typing import Any, Dict

from vitasks.convert.common import HF_LAYER_PARTS, HF_TOP_TIMM, ConvertOptions, HFEncoderNames, Source, StateDict, read_torch_state_dict
from vitasks.errors import CheckpointError

HF_DEFAULT_EPS = 1e-12

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

_TOP_MAP = {
    **HF_TOP_TIMM,
    "embeddings.distillation_token": "dist_token",
    "pooler.dense.weight": "pre_logits.fc.weight",
    "pooler.dense.bias": "pre_logits.fc.bias",
}
_HEAD_MAP = {"classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist"}


def _find_files(path: str):
    """(weight files, the folder) for a file or a model folder."""
    if os.path.isdir(path):
        folder = path
        # One copy of the weights: safetensors when both formats are there.
        files = [os.path.join(path, f) for f in _WEIGHT_FILES if os.path.isfile(os.path.join(path, f))][:1]
        if not files:
            for index in _INDEX_FILES:
                ipath = os.path.join(path, index)
                if os.path.isfile(ipath):
                    with open(ipath, encoding="utf-8") as f:
                        shards = sorted(set(json.load(f).get("weight_map", {}).values()))
                    files = [os.path.join(path, s) for s in shards]
                    break
        if not files:
            found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*")))[:10]
            raise CheckpointError(
                f"{path}: no {' or '.join(_WEIGHT_FILES)} (or sharded index) in this folder; found {found}"
            )
    elif os.path.isfile(path):
        folder, files = os.path.dirname(path), [path]
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    return files, folder


def _read_config(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the model config ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return cfg


def apply_config(src: Source, cfg: Dict[str, Any], default_eps: float, defaults_of: str) -> None:
    """What a transformers ``config.json`` says that the weights cannot: the LayerNorm epsilon
    (``default_eps``, ``defaults_of``'s default, without a config), the heads, the activation and
    the grid the position embeddings were trained at."""
    if not cfg:
        src.notes.append(f"no config.json beside the weights: layer_norm_eps={default_eps} assumed ({defaults_of}'s default)")
    src.norm_eps = float(cfg.get("layer_norm_eps", default_eps))
    if "num_attention_heads" in cfg:
        src.num_heads = int(cfg["num_attention_heads"])
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        src.notes.append(f"hidden_act={act!r}: vitasks' MLP uses exact GELU, so outputs will differ slightly")
    if "image_size" in cfg and "patch_size" in cfg:
        img, patch = cfg["image_size"], cfg["patch_size"]
        img = (img, img) if isinstance(img, int) else tuple(img)
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        src.grid = (img[0] // patch[0], img[1] // patch[1])


def hf_to_timm(sd: StateDict, where: str) -> StateDict:
    """Rename a transformers ViT/DeiT state dict to timm's names (fusing q, k, v)."""
    prefix = ""
    for p in ("vit.", "deit."):
        if any(k.startswith(p) for k in sd):
            prefix = p
    names = HFEncoderNames(_TOP_MAP, HF_LAYER_PARTS)
    for key, v in sd.items():
        head = key.split(".")[0]
        if head in _HEAD_MAP and key.count(".") == 1:
            names.out[f"{_HEAD_MAP[head]}.{key.split('.')[1]}"] = v
        elif not key.startswith(prefix) or not (key[len(prefix):] == "embeddings.mask_token"
                                                or names.place(key[len(prefix):], v)):
            names.unknown.append(key)
    return names.result(where, "ViT/DeiT", "vit.embeddings.*, vit.encoder.layer.*, vit.layernorm, classifier")


def read(path: str, opts: ConvertOptions) -> Source:
    """A transformers ViT/DeiT checkpoint file or folder."""
    files, folder = _find_files(path)
    sd: StateDict = {}
    for f in files:
        sd.update(read_torch_state_dict(f))
    cfg = _read_config(os.path.join(folder, "config.json"))
    from vitasks.convert import hf_video  # TimeSformer, VideoMAE and ViViT map themselves

    if hf_video.detect_video_model(sd):
        return hf_video.read(sd, cfg, path, opts, folder)
    from vitasks.convert import hf_beit  # BEiT / Data2Vec-vision (semantic segmentation)

    if hf_beit.detect(sd) is not None:
        return hf_beit.read(sd, cfg, path, opts, folder)
    from vitasks.convert import hf_dinov2  # Dinov2[WithRegisters]Model / ForImageClassification

    if hf_dinov2.detect(sd, cfg):
        return hf_dinov2.read(sd, cfg, path, opts)
    src = Source(fmt="hf", path=path, state_dict=hf_to_timm(sd, path))
    pre = _read_config(os.path.join(folder, "preprocessor_config.json"))
    if isinstance(pre.get("image_mean"), list) and isinstance(pre.get("image_std"), list):
        # transformers' processors normalise 0-1 images; vitasks' preprocessor 0-255 ones.
        src.input_norm = dict(mean=[round(float(m) * 255, 4) for m in pre["image_mean"]],
                              std=[round(float(s) * 255, 4) for s in pre["image_std"]])
    apply_config(src, cfg, HF_DEFAULT_EPS, "HF")
    # transformers' ViT/DeiT pool the first token; a DeiT "with teacher" averages both heads.
    if "head_dist.weight" in src.state_dict:
        src.notes.append("HF DeiTForImageClassificationWithTeacher: distillation_classifier dropped")
    return src
