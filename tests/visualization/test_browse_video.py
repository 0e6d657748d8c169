"""tools/browse_dataset.py on the video demo config: sampled, augmented clips as strips."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("av")

from vitasks.config import load_config  # noqa: E402
from vitasks.data.synthetic.video import make_video_dataset  # noqa: E402
from vitasks.visualization.browse import FRAME_GAP, browse_dataset, iter_training_samples  # noqa: E402

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "demo" / "video_synthetic.yaml")


def test_browse_the_video_demo_draws_the_training_clips(tmp_path):
    root = make_video_dataset(str(tmp_path / "data"), train_per_class=1, val_per_class=1, size=32, num_frames=10)
    options = [f"data_root={root}", "img_size=32"]
    written = browse_dataset(CONFIG, tmp_path / "out", num=2, cfg_options=options)
    assert len(written) == 2
    cfg = load_config(CONFIG, options)
    for path, item in zip(written, iter_training_samples(cfg, 2)):
        # Named after the video, in stream order.
        stem = os.path.splitext(os.path.basename(item.packed["data_samples"].filename))[0]
        assert os.path.basename(path) == f"{item.position:04d}_{stem}.png"
        png = np.asarray(Image.open(path).convert("RGB"))
        clip = item.packed["inputs"].numpy()  # (3, T, H, W), the training pipeline's output
        assert clip.shape == (3, 8, 32, 32)
        scale = int(np.ceil(256 / 32))  # enlarged to a 256 px short side, nearest neighbour
        side = 32 * scale
        assert png.shape[1] == 8 * side + 7 * FRAME_GAP
        strip = png[-side:]
        for t in range(8):
            frame = strip[::scale, t * (side + FRAME_GAP):t * (side + FRAME_GAP) + side:scale]
            np.testing.assert_array_equal(frame, clip[:, t].transpose(1, 2, 0))
