"""tools/bench_video.py --data: the config's training pipeline, measured as one worker runs it."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("av")

from vitasks.data.synthetic.video import make_video_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("bench_video", REPO / "tools" / "bench_video.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_speed_runs_the_demo_training_pipeline(tmp_path, capsys):
    root = make_video_dataset(str(tmp_path / "data"), train_per_class=1, val_per_class=0, size=32, num_frames=10)
    out = tmp_path / "data.json"
    tool = _tool()
    assert tool.main(["--data", str(REPO / "configs" / "demo" / "video_synthetic.yaml"), "--cfg-options",
                      f"data_root={root}", "img_size=32", "--seconds", "0.2", "--json", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["videos"] == 4 and result["clips"] >= 1
    assert result["shape"] == [3, 8, 32, 32]  # the demo's clip: 8 frames, cropped to img_size
    assert result["clips_per_s"] > 0 and result["cpu_ms_per_clip"] > 0
    assert "clips/s" in capsys.readouterr().out
