"""Classification weights (timm, MAE, vitasks) load into a detector's ViTDet backbone through
``load_from``: the class token is dropped, the position embeddings are resampled to the detector's
grid, the blocks are copied as they are, and the task heads keep their own initialisation."""

import os

import pytest
import torch
import torch.nn.functional as F

from vitasks.convert import convert_checkpoint
from vitasks.engine.launch import build_runner, prepare_config

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "det_coco.yaml")
DIM, DEPTH, HEADS, PATCH = 32, 2, 2, 16
# det_coco.yaml's ViTDet Mask R-CNN made tiny: a 96 x 96 input (a 6 x 6 grid; the 224-style
# checkpoint below has a 4 x 4 grid, kept as the pre-training grid as det_coco.yaml keeps 14 x 14
# and interpolated every forward), windows of 3 in block 0, block 1 global, relative positions.
TINY = [
    "num_classes=3",
    "img_size=96",
    "input_size=[96,96]",
    f"model.backbone.embed_dim={DIM}",
    f"model.backbone.depth={DEPTH}",
    f"model.backbone.num_heads={HEADS}",
    "model.backbone.out_indices=[-1]",
    "model.backbone.window_size=3",
    "model.backbone.pretrain_img_size=64",
    "model.backbone.global_indices=[1]",
    "model.backbone.with_cp=false",
    "model.backbone.drop_path_rate=0.0",
    f"model.neck.in_channels={DIM}",
    "model.neck.out_channels=16",
    "model.rpn_head.in_channels=16",
    "model.roi_head.in_channels=16",
    "model.roi_head.box_head.conv_channels=16",
    "model.roi_head.box_head.fc_channels=32",
    "model.roi_head.mask_head.conv_channels=16",
]


def timm_vit_state_dict(grid: int = 4, num_classes: int = 10) -> dict:
    """A random ViT in timm's naming (class token, (1, 1 + grid^2, C) position embeddings, head)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {
        "cls_token": rand(1, 1, DIM),
        "pos_embed": rand(1, 1 + grid * grid, DIM),
        "patch_embed.proj.weight": rand(DIM, 3, PATCH, PATCH),
        "patch_embed.proj.bias": rand(DIM),
        "norm.weight": 1 + rand(DIM),
        "norm.bias": rand(DIM),
        "head.weight": rand(num_classes, DIM),
        "head.bias": rand(num_classes),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd.update({
            p + "norm1.weight": 1 + rand(DIM), p + "norm1.bias": rand(DIM),
            p + "attn.qkv.weight": rand(3 * DIM, DIM), p + "attn.qkv.bias": rand(3 * DIM),
            p + "attn.proj.weight": rand(DIM, DIM), p + "attn.proj.bias": rand(DIM),
            p + "norm2.weight": 1 + rand(DIM), p + "norm2.bias": rand(DIM),
            p + "mlp.fc1.weight": rand(4 * DIM, DIM), p + "mlp.fc1.bias": rand(4 * DIM),
            p + "mlp.fc2.weight": rand(DIM, 4 * DIM), p + "mlp.fc2.bias": rand(DIM),
        })
    return sd


def mae_state_dict() -> dict:
    """MAE's pre-training layout: the encoder in timm's names plus the decoder and mask token,
    no classification head, in ``{"model": ...}``."""
    sd = {k: v for k, v in timm_vit_state_dict().items() if not k.startswith("head.")}
    sd["mask_token"] = torch.zeros(1, 1, 16)
    sd["decoder_embed.weight"] = torch.zeros(16, DIM)
    sd["decoder_pred.weight"] = torch.zeros(3 * PATCH * PATCH, 16)
    return {"model": sd}


def expected_pos_embed(pos_embed: torch.Tensor, grid: int, new_grid: int) -> torch.Tensor:
    """Reference resampling: drop the class token's row, bicubic 2D interpolation of the grid."""
    table = pos_embed[:, 1:].reshape(1, grid, grid, DIM).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, DIM)


def load_into_detector(checkpoint: str, tmp_path):
    cfg = prepare_config(CONFIG, TINY + [f"load_from={checkpoint}"], work_dir=str(tmp_path / "wd"))
    runner = build_runner(cfg)
    heads_before = {k: v.clone() for k, v in runner.model.state_dict().items() if not k.startswith("backbone.")}
    runner.load_or_resume()  # what train() does first: load_from, with the vitasks rules
    return runner.model, heads_before


@pytest.mark.parametrize("source", ["timm", "mae", "vitasks"])
def test_classification_weights_load_into_the_vitdet_backbone(source, tmp_path):
    timm_sd = timm_vit_state_dict()
    if source == "timm":
        path = tmp_path / "timm.pth"
        torch.save(timm_sd, path)
        checkpoint = tmp_path / "converted.pth"
        convert_checkpoint("timm", str(path), str(checkpoint))
    elif source == "mae":
        path = tmp_path / "mae.pth"
        torch.save(mae_state_dict(), path)
        checkpoint = tmp_path / "converted.pth"
        convert_checkpoint("mae", str(path), str(checkpoint))
    else:  # a vitasks classifier's own training checkpoint (backbone.* + head.*)
        path = tmp_path / "timm.pth"
        torch.save(timm_sd, path)
        convert_checkpoint("timm", str(path), str(tmp_path / "cls.pth"))
        converted = torch.load(tmp_path / "cls.pth", weights_only=True)
        checkpoint = tmp_path / "epoch_1.pth"
        torch.save({"state_dict": converted["state_dict"], "meta": {"epoch": 1}}, checkpoint)

    model, heads_before = load_into_detector(str(checkpoint), tmp_path)
    backbone = model.backbone
    assert backbone.cls_token is None
    # the class token's entry dropped, the 4 x 4 grid kept as stored (pretrain_img_size=64)
    torch.testing.assert_close(backbone.pos_embed.detach(), expected_pos_embed(timm_sd["pos_embed"], 4, 4))
    torch.testing.assert_close(backbone.stem.proj.weight.detach(), timm_sd["patch_embed.proj.weight"])
    loaded = backbone.state_dict()
    for i in range(DEPTH):
        for name in ("attn.qkv.weight", "attn.proj.bias", "mlp.fc1.weight", "norm2.bias"):
            torch.testing.assert_close(loaded[f"blocks.{i}.{name}"], timm_sd[f"blocks.{i}.{name}"])
    # The neck and the detection heads are not in the checkpoint: untouched.
    for key, value in model.state_dict().items():
        if key in heads_before:
            assert torch.equal(value, heads_before[key]), key
    # The loaded detector runs.
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 96), mode="tensor")
    assert out["cls_logits"].shape[1] == 3 + 1
