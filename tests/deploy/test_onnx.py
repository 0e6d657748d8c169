"""ONNX export (tools/export_onnx.py, vitasks.deploy): the graph that onnxruntime runs gives
PyTorch's outputs at batch sizes other than the traced one; an untraceable module is named; a
mismatch fails the tool."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from vitasks.apis import init_model  # noqa: E402
from vitasks.cli import main as cli_main  # noqa: E402
from vitasks.deploy import ExportError, export_onnx, export_spec  # noqa: E402
from vitasks.deploy import onnx as deploy_onnx  # noqa: E402

CLS_MEAN = [127.5, 120.0, 110.0]
CLS_STD = [60.0, 61.0, 62.0]
CLASSES = ["red", "green", "blue"]


def cls_config() -> dict:
    return {
        "default_scope": "vitasks",
        "num_classes": 3,
        "class_names": CLASSES,
        "model": {
            "type": "ImageClassifier",
            "data_preprocessor": {"type": "ClsDataPreprocessor", "mean": CLS_MEAN, "std": CLS_STD},
            "backbone": {"type": "VisionTransformer", "img_size": 16, "patch_size": 4, "embed_dim": 16,
                         "depth": 2, "num_heads": 2},
            "head": {"type": "LinearClsHead", "num_classes": 3, "in_channels": 16},
        },
        "test_pipeline": [{"type": "LoadImage"}, {"type": "ResizeCenterCrop", "size": 16, "crop_ratio": 1.0},
                          {"type": "PackInputs"}],
    }


def seg_config() -> dict:
    # UperNet's pyramid pooling to 1, 2, 3 and 6 of an 8 x 10 map (28 x 36 padded to 32 x 40, at
    # stride 4): sizes that do not divide it, which the TorchScript-based exporter cannot translate.
    return {
        "default_scope": "vitasks",
        "model": {
            "type": "EncoderDecoder",
            "backbone": {"type": "VisionTransformer", "img_size": 32, "patch_size": 8, "embed_dim": 16,
                         "depth": 2, "num_heads": 2, "out_indices": [0, 1]},
            "neck": {"type": "Feature2Pyramid", "embed_dim": 16, "rescales": [4, 2]},
            "decode_head": {"type": "UPerHead", "in_channels": [16, 16], "in_index": [0, 1], "channels": 8,
                            "pool_scales": [1, 2, 3, 6], "num_classes": 4},
            "test_cfg": {"mode": "whole"},
        },
    }


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights and BatchNorm statistics away from their (often zero) initial values, so the
    outputs differ between classes and pixels."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point() or name.endswith(("mean", "std")) and "preprocessor" in name:
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return model


def onnxruntime_outputs(path, inputs: torch.Tensor) -> list[np.ndarray]:
    """The file run by onnxruntime directly (not through vitasks' helpers)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs.numpy()})


def metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def exported_classifier(tmp_path_factory):
    """The tiny classifier with a checkpoint, exported by the tool (exit status 0)."""
    root = tmp_path_factory.mktemp("cls")
    config = root / "tiny_cls.yaml"
    config.write_text(yaml.safe_dump(cls_config()))
    model = randomise(init_model(str(config)))
    checkpoint = root / "tiny.pth"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    out = root / "tiny_cls.onnx"
    status = cli_main(["export-onnx", str(config), str(checkpoint), str(out), "--batch-size", "3"])
    assert status == 0
    return config, checkpoint, out


@pytest.mark.parametrize("batch_size", [2, 5])
def test_classifier_onnx_equals_pytorch(exported_classifier, batch_size):
    config, checkpoint, path = exported_classifier
    model = init_model(str(config), str(checkpoint))
    inputs = torch.randn(batch_size, 3, 16, 16)
    with torch.no_grad():
        expected = model(inputs, mode="tensor")
    (logits,) = onnxruntime_outputs(path, inputs)
    assert logits.shape == (batch_size, 3)
    assert expected.abs().max() > 0.1  # non-trivial outputs
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-5)


def test_classifier_onnx_metadata(exported_classifier):
    _, _, path = exported_classifier
    meta = metadata(path)
    # The config's data_preprocessor, not the ImageNet defaults.
    np.testing.assert_allclose(json.loads(meta["vitasks.mean"]), CLS_MEAN, rtol=1e-6)
    np.testing.assert_allclose(json.loads(meta["vitasks.std"]), CLS_STD, rtol=1e-6)
    assert json.loads(meta["vitasks.classes"]) == CLASSES
    assert list(json.loads(meta["vitasks.outputs"])) == ["logits"]
    assert json.loads(meta["vitasks.input_shape"]) == ["N", 3, 16, 16]
    assert meta["vitasks.task_model"] == "ImageClassifier"
    assert "ResizeCenterCrop" in meta["vitasks.test_pipeline"]
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_timing_onnxruntime_beside_eager(exported_classifier):
    """The timing helpers run both engines on the exported file (no speed is asserted)."""
    from vitasks.benchmarks.onnx_timing import compare_onnx_eager_model, format_comparison, time_onnxruntime

    config, checkpoint, path = exported_classifier
    times = time_onnxruntime(str(path), batch_size=2, iters=3, warmup=0)
    assert len(times) == 3 and all(t > 0 for t in times)
    result = compare_onnx_eager_model(str(path), init_model(str(config), str(checkpoint)), batch_size=2,
                                      iters=3, warmup=1)
    for engine in ("onnxruntime", "pytorch"):
        assert len(result[engine]["times_s"]) == 3
        assert result[engine]["images_per_s"] == pytest.approx(2 / result[engine]["median_s"])
    assert result["input_shape"] == [3, 16, 16]
    assert "onnxruntime / pytorch" in format_comparison(result)


@pytest.fixture(scope="module")
def exported_segmentor(tmp_path_factory):
    """The tiny segmentor exported through the Python API at 28 x 36 (padded to the stride
    inside the graph), with its reference model."""
    torch.manual_seed(0)
    model = randomise(init_model(seg_config()), seed=1)
    path = tmp_path_factory.mktemp("seg") / "tiny_seg.onnx"
    result = export_onnx(model, str(path), batch_size=2, img_size=(28, 36))
    assert result.output_names == ["seg_logits"]
    assert max(result.differences.values()) <= 1e-4
    return model, path


@pytest.mark.parametrize("batch_size", [1, 3])
def test_segmentor_onnx_equals_whole_inference(exported_segmentor, batch_size):
    model, path = exported_segmentor
    inputs = torch.randn(batch_size, 3, 28, 36)
    with torch.no_grad():
        samples = model.predict(inputs)  # whole-image inference, logits at the input size
    expected = torch.stack([s.seg_logits.data for s in samples])
    (logits,) = onnxruntime_outputs(path, inputs)
    assert logits.shape == (batch_size, 4, 28, 36)
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-5)
    labels = torch.stack([s.pred_sem_seg.data[0] for s in samples])
    assert torch.equal(torch.from_numpy(logits).argmax(1), labels)
    assert "argmax" in metadata(path)["vitasks.postprocess"]


# ------------------------------------------------------------------------------ bad models


class NumpyMlp(nn.Module):
    """Leaves torch for numpy: torch.export cannot follow it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.tanh(x.detach().numpy()))


class BatchOfTwoMlp(nn.Module):
    """Traceable, but writes the batch size as a number: the graph would not be batch-dynamic.
    The error carries no frame of this module, so it is found by exporting submodules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(2, -1).reshape(x.shape)


class EighHead(nn.Module):
    """Traceable, but uses an op the ONNX exporter has no translation for."""

    def forward(self, feats) -> torch.Tensor:
        x = feats[-1]
        gram = x[:, :, None] * x[:, None, :]
        return torch.linalg.eigvalsh(gram)


@pytest.fixture
def tiny_classifier():
    return init_model(cls_config()).eval()


def test_untraceable_module_is_named(tiny_classifier, tmp_path):
    tiny_classifier.backbone.blocks[1].mlp = NumpyMlp()
    with pytest.raises(ExportError, match=r"module `backbone\.blocks\.1\.mlp` \(NumpyMlp\)") as info:
        export_onnx(tiny_classifier, str(tmp_path / "bad.onnx"))
    assert "torch.export could not trace it" in str(info.value)
    assert not (tmp_path / "bad.onnx").exists()


def test_fixed_batch_size_names_the_module(tiny_classifier, tmp_path):
    tiny_classifier.backbone.blocks[1].mlp = BatchOfTwoMlp()
    with pytest.raises(ExportError, match=r"module `backbone\.blocks\.1\.mlp` \(BatchOfTwoMlp\)") as info:
        export_onnx(tiny_classifier, str(tmp_path / "bad.onnx"))
    assert "fixes the batch size" in str(info.value)


def test_untranslatable_op_names_its_module(tiny_classifier, tmp_path):
    tiny_classifier.head = EighHead()
    with pytest.raises(ExportError, match=r"module `head` \(EighHead\)") as info:
        export_onnx(tiny_classifier, str(tmp_path / "bad.onnx"))
    assert "eigh" in str(info.value)


def test_tool_exit_status_on_mismatch(tmp_path, monkeypatch, capsys):
    """onnxruntime's outputs perturbed by 1e-3 of their scale: the tool says so and exits 1."""
    config = tmp_path / "tiny_cls.yaml"
    config.write_text(yaml.safe_dump(cls_config()))
    real_run = deploy_onnx.run_onnxruntime

    def perturbed(session, inputs):
        return [out + 1e-3 * (np.abs(out).max() + 1.0) for out in real_run(session, inputs)]

    monkeypatch.setattr(deploy_onnx, "run_onnxruntime", perturbed)
    status = cli_main(["export-onnx", str(config), "none", str(tmp_path / "out.onnx")])
    assert status == 1
    err = capsys.readouterr().err
    assert "differ from PyTorch's above the tolerance 0.0001" in err
    assert "output `logits` at batch 2" in err


def test_tool_exit_status_on_bad_checkpoint(tmp_path, capsys):
    config = tmp_path / "tiny_cls.yaml"
    config.write_text(yaml.safe_dump(cls_config()))
    assert cli_main(["export-onnx", str(config), str(tmp_path / "missing.pth"), str(tmp_path / "o.onnx")]) == 2
    assert "missing.pth" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the contract


class DeclaresExport(nn.Module):
    """A task model that declares its export (as a detector would: raw head outputs)."""

    export_outputs = {"cls_scores": "per-anchor class logits", "bbox_deltas": "per-anchor box deltas"}
    export_postprocess = "decode the deltas against the anchors, then NMS"

    def forward_export(self, inputs: torch.Tensor):
        return inputs.mean((2, 3)), inputs.amax((2, 3))


def test_model_declared_export_spec_wins():
    model = DeclaresExport()
    spec = export_spec(model)
    assert spec.output_names == ["cls_scores", "bbox_deltas"]
    assert spec.postprocess == "decode the deltas against the anchors, then NMS"
    x = torch.randn(2, 3, 4, 4)
    scores, deltas = spec.forward(model, x)
    torch.testing.assert_close(scores, x.mean((2, 3)))
    torch.testing.assert_close(deltas, x.amax((2, 3)))


def test_relative_difference_formula():
    expected = np.array([[2.0, -4.0], [1.0, 0.0]])
    actual = expected + np.array([[0.0, 0.0], [0.02, 0.0]])
    assert deploy_onnx.relative_difference(actual, expected) == pytest.approx(0.02 / 4.0)
    assert deploy_onnx.relative_difference(np.zeros(2), np.zeros(3)) == float("inf")
    assert deploy_onnx.relative_difference(np.full(2, 1e-3), np.zeros(2)) == pytest.approx(1e-3)


def video_config(attention_type: str) -> dict:
    return {
        "default_scope": "vitasks",
        "model": {
            "type": "Recognizer",
            "backbone": {"type": "VideoVisionTransformer", "num_frames": 4, "img_size": 16, "patch_size": 8,
                         "tubelet_size": 2, "embed_dim": 16, "depth": 2, "num_heads": 2,
                         "attention_type": attention_type},
            "head": {"type": "VideoClsHead", "num_classes": 5, "in_channels": 16},
        },
    }


@pytest.mark.parametrize("attention_type", ["divided", "factorised_encoder"])
def test_video_recognizer_onnx_equals_pytorch_at_two_batch_sizes(attention_type, tmp_path):
    model = randomise(init_model(video_config(attention_type)), seed=2)
    path = tmp_path / "video.onnx"
    result = export_onnx(model, str(path), batch_size=2)
    assert result.output_names == ["logits"]
    assert json.loads(metadata(path)["vitasks.input_shape"]) == ["N", 3, 4, 16, 16]
    for batch_size in (1, 3):  # neither is the traced batch
        inputs = torch.randn(batch_size, 3, 4, 16, 16)
        with torch.no_grad():
            expected = model(inputs, mode="tensor")
        (logits,) = onnxruntime_outputs(path, inputs)
        assert logits.shape == (batch_size, 5) and expected.abs().max() > 0.1
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-5)
