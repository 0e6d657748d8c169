"""Video data: frame sampling against mmaction2's definitions on hand-worked cases, decoding only
the needed frames, clip transforms that treat every frame alike, the list datasets and their
errors, and the generated motion dataset."""

import json
import os

import cv2
import numpy as np
import pytest

av = pytest.importorskip("av")

import vitasks.data  # noqa: E402,F401  (registers)
from vitasks.data import video_io  # noqa: E402
from vitasks.data.seeding import SeededIndex  # noqa: E402
from vitasks.data.synthetic.video import DIRECTIONS, make_video_dataset, render_clip, write_mp4  # noqa: E402
from vitasks.data.video import RawFrameDataset, VideoListDataset  # noqa: E402
from vitasks.data.video_io import probe_video, read_video_frames  # noqa: E402
from vitasks.data.video_transforms import (  # noqa: E402
    DecodeFrames,
    PackVideoInputs,
    SampleFrames,
    ThreeCrop,
    UniformSample,
    VideoAlbu,
)
from vitasks.errors import ConfigError, DataError  # noqa: E402
from vitasks.registry import DATASETS  # noqa: E402


class ScriptedRng:
    """Stands in for a numpy Generator: returns scripted values and records the ranges asked
    for, so a test can check both the bounds a sampler draws from and what it does with a draw."""

    def __init__(self, values):
        self.values = list(values)
        self.calls = []

    def integers(self, low, high=None, size=None):
        self.calls.append(("integers", low, high, size))
        if size is None:
            return self.values.pop(0)
        out = np.array(self.values[:size], dtype=np.int64)
        del self.values[:size]
        return out

    def uniform(self, low, high, size):
        self.calls.append(("uniform", low, high, size))
        out = np.array(self.values[:size], dtype=np.float64)
        del self.values[:size]
        return out


def sample(sampler, total, rng=None, **extra):
    results = {"total_frames": total, "filename": "clip.mp4", **extra}
    if rng is not None:
        results["rng"] = rng
    return sampler(results)["frame_inds"].reshape(-1, sampler.clip_len).tolist()


# ------------------------------------------------------------------------------ SampleFrames


def test_sample_frames_training_offsets_hand_worked():
    # 100 frames, 8 frames every 2 (span 16): one stretch of (100 - 16 + 1) // 1 = 85 starts.
    rng = ScriptedRng([84])
    assert sample(SampleFrames(8, 2), 100, rng) == [list(range(84, 100, 2))]
    assert rng.calls == [("integers", 85, None, 1)]
    # 3 clips of 4 every 2 in 50 frames: stretches of (50 - 8 + 1) // 3 = 14 starts at 0, 14, 28.
    rng = ScriptedRng([1, 2, 13])
    assert sample(SampleFrames(4, 2, num_clips=3), 50, rng) == [[1, 3, 5, 7], [16, 18, 20, 22], [41, 43, 45, 47]]
    assert rng.calls == [("integers", 14, None, 3)]
    # Stretch 3 // 4 = 0 but 10 > max(4, 8): 4 sorted random starts in 0..2.
    rng = ScriptedRng([2, 0, 1, 0])
    assert sample(SampleFrames(4, 2, num_clips=4), 10, rng) == [
        [0, 2, 4, 6], [0, 2, 4, 6], [1, 3, 5, 7], [2, 4, 6, 8]]
    assert rng.calls == [("integers", 3, None, 4)]
    # Stretch 0 and 8 frames not more than max(3, 8): starts around(i * 1 / 3) = 0, 0, 1, no draw.
    rng = ScriptedRng([])
    assert sample(SampleFrames(4, 2, num_clips=3), 8, rng) == [[0, 2, 4, 6], [0, 2, 4, 6], [1, 3, 5, 7]]
    assert rng.calls == []


def test_sample_frames_keep_tail_frames():
    # Stretches of (20 - 8 + 1) / 2 = 6.5: starts int(0 + 6.4) = 6 and int(6.5 + 0.5) = 7.
    rng = ScriptedRng([6.4, 0.5])
    assert sample(SampleFrames(4, 2, num_clips=2, keep_tail_frames=True), 20, rng) == [
        [6, 8, 10, 12], [7, 9, 11, 13]]
    assert rng.calls == [("uniform", 0, 6.5, 2)]


def test_sample_frames_test_mode_evenly_spread():
    # Last possible start 100 - (7 * 2 + 1) = 85; 3 clips at round(0, 42.5, 85) = 0, 42 (half to
    # even, as numpy), 85; the last clip ends at frame 99.
    clips = sample(SampleFrames(8, 2, num_clips=3, test_mode=True), 100)
    assert [c[0] for c in clips] == [0, 42, 85] and clips[2][-1] == 99
    # One clip: the middle start 85 // 2 = 42.
    assert sample(SampleFrames(8, 2, test_mode=True), 100) == [list(range(42, 57, 2))]
    # Single frames: the centres of 3 segments of 10 / 3 frames: 1.67, 5, 8.33 -> 1, 5, 8.
    assert sample(SampleFrames(1, num_clips=3, test_mode=True), 10) == [[1], [5], [8]]
    # No randomness in testing: the same clips without any generator.
    assert sample(SampleFrames(4, 3, num_clips=2, test_mode=True), 30) == [[0, 3, 6, 9], [20, 23, 26, 29]]


def test_sample_frames_short_video_loop_repeat_last_and_error():
    # 5 frames, a clip of 4 every 2 needs 7: the start is 0 and frames 6 is past the end.
    assert sample(SampleFrames(4, 2, test_mode=True), 5) == [[0, 2, 4, 1]]  # 6 mod 5
    assert sample(SampleFrames(4, 2, test_mode=True, out_of_bound_opt="repeat_last"), 5) == [[0, 2, 4, 4]]
    assert sample(SampleFrames(4, 2, out_of_bound_opt="loop"), 5, ScriptedRng([])) == [[0, 2, 4, 1]]
    with pytest.raises(DataError, match=r"clip\.mp4 has 5 frames.*7"):
        sample(SampleFrames(4, 2, out_of_bound_opt="error"), 5, ScriptedRng([]))
    # A long enough video passes under `error`.
    assert sample(SampleFrames(4, 2, test_mode=True, out_of_bound_opt="error"), 7) == [[0, 2, 4, 6]]


def test_sample_frames_bad_arguments():
    with pytest.raises(ConfigError, match="out_of_bound_opt"):
        SampleFrames(4, out_of_bound_opt="wrap")
    with pytest.raises(ConfigError, match="clip_len"):
        SampleFrames(0)
    with pytest.raises(DataError, match="no frames"):
        SampleFrames(4)({"total_frames": 0, "filename": "empty.mp4"})


def test_sample_frames_draws_from_the_sample_generator():
    make = lambda seed: {"total_frames": 300, "rng": np.random.default_rng(seed)}  # noqa: E731
    sampler = SampleFrames(8, 4, num_clips=2)
    first = sampler(make(7))["frame_inds"]
    assert np.array_equal(first, sampler(make(7))["frame_inds"])
    assert any(not np.array_equal(first, sampler(make(s))["frame_inds"]) for s in range(8, 12))


# ----------------------------------------------------------------------------- UniformSample


def test_uniform_sample_segments_hand_worked():
    # 10 frames, 4 segments of 9 / 4 = 2.25: starts round(0, 2.25, 4.5, 6.75) = 0, 2, 4, 7 and
    # ends round(2.25, 4.5, 6.75, 9) = 2, 4, 7, 9 (ends included in the draw).
    rng = ScriptedRng([0, 4, 5, 9])
    assert sample(UniformSample(4), 10, rng) == [[0, 4, 5, 9]]
    assert rng.calls == [("integers", 0, 3, None), ("integers", 2, 5, None), ("integers", 4, 8, None),
                         ("integers", 7, 10, None)]
    # Test: start + int(2.25 / 2) = start + 1; two views: + int(0.75) and + int(1.5).
    assert sample(UniformSample(4, test_mode=True), 10) == [[1, 3, 5, 8]]
    assert sample(UniformSample(4, num_clips=2, test_mode=True), 10) == [[0, 2, 4, 7], [1, 3, 5, 8]]
    # Shorter than a clip: segments of 0.5 frames repeat frames.
    assert sample(UniformSample(4, test_mode=True), 3) == [[0, 0, 1, 2]]
    with pytest.raises(DataError, match=r"clip\.mp4 has 3 frames"):
        sample(UniformSample(4, test_mode=True, allow_repeat=False), 3)
    with pytest.raises(ConfigError, match="test_mode"):
        UniformSample(4, num_clips=2)


# ----------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    """A tiny generated dataset: 4 directions x (2 train + 1 val) clips of 20 frames of 32 px,
    a keyframe every 6 frames."""
    root = str(tmp_path_factory.mktemp("video") / "synthetic")
    make_video_dataset(root, seed=3, train_per_class=2, val_per_class=1, size=32, num_frames=20,
                       keyframe_interval=6)
    return root


def full_decode(path):
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_selected_frames_equal_a_full_decode(dataset_root):
    path = os.path.join(dataset_root, "train", "up", "up_0001.mp4")
    everything = full_decode(path)
    assert probe_video(path).num_frames == len(everything) == 20
    for selection in ([0], [19], [7, 8, 9], [13, 2, 2, 18], list(range(20)), [6], [5, 6, 12, 17]):
        assert np.array_equal(read_video_frames(path, selection), everything[selection]), selection
    # A container without timestamps is read from the start, counting frames.
    no_pts = video_io.VideoIndex(path=path, pts=None, num_frames=20, fps=8.0)
    assert np.array_equal(read_video_frames(path, [13, 2, 2, 18], index=no_pts), everything[[13, 2, 2, 18]])


def test_reading_the_end_seeks_instead_of_decoding_everything(dataset_root, monkeypatch):
    decoded = []

    class CountingContainer:
        def __init__(self, container):
            self._container = container

        def __getattr__(self, name):
            return getattr(self._container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._container.close()

        def decode(self, *args, **kwargs):
            for frame in self._container.decode(*args, **kwargs):
                decoded.append(frame.pts)
                yield frame

    real_open = video_io._open
    monkeypatch.setattr(video_io, "_open", lambda av_, path: CountingContainer(real_open(av_, path)))
    path = os.path.join(dataset_root, "val", "left", "left_0000.mp4")
    read_video_frames(path, [18, 19])
    # From the keyframe at or before frame 18 (one every 6 frames at most): at most 7 frames.
    assert 2 <= len(decoded) <= 7


# ----------------------------------------------------------------------------- clip transforms

TRAIN_AUGMENTS = [
    dict(type="SmallestMaxSize", max_size=40, interpolation="nearest"),
    dict(type="RandomResizedCrop", size=[24, 24], scale=[0.2, 1.0], interpolation="nearest"),
    dict(type="HorizontalFlip", p=0.5),
]


def test_identical_frames_stay_identical_after_training_transforms():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    augment = VideoAlbu(TRAIN_AUGMENTS + [dict(type="ColorJitter", brightness=0.4, contrast=0.4, saturation=0.4,
                                                hue=0.1, p=1.0)])
    outputs = []
    for seed in range(6):
        out = augment({"imgs": np.stack([frame] * 8), "rng": np.random.default_rng(seed)})["imgs"]
        assert out.shape == (8, 24, 24, 3)
        assert all(np.array_equal(out[0], out[t]) for t in range(8))
        outputs.append(out[0])
    # ... while different samples do get different crops, flips and colours.
    assert len({o.tobytes() for o in outputs}) == 6


def test_every_frame_gets_the_same_crop_and_flip():
    # Frame t is the base frame plus t everywhere: after the same (nearest-neighbour) geometry for
    # all frames, output frame t is output frame 0 plus t at every pixel.
    base = np.random.default_rng(1).integers(0, 200, (30, 50, 3), dtype=np.uint8)
    clip = np.stack([base + t for t in range(8)]).astype(np.uint8)
    augment = VideoAlbu(TRAIN_AUGMENTS)
    for seed in range(4):
        out = augment({"imgs": clip, "rng": np.random.default_rng(seed)})["imgs"].astype(np.int16)
        for t in range(8):
            assert np.array_equal(out[t] - out[0], np.full_like(out[0], t))


def test_three_crop_and_packing_layout():
    # 2 clips x 3 frames of 6 x 10; pixel values say (frame, row, column).
    frames = np.zeros((6, 6, 10, 3), np.uint8)
    frames[..., 0] = np.arange(6)[:, None, None]
    frames[..., 1] = np.arange(6)[None, :, None]
    frames[..., 2] = np.arange(10)[None, None, :]
    results = ThreeCrop(4)({"imgs": frames, "num_clips": 2, "clip_len": 3, "filename": "v.mp4"})
    assert results["num_crops"] == 3 and results["imgs"].shape == (18, 4, 4, 3)
    packed = PackVideoInputs()(dict(results, gt_label=2))
    inputs, data_sample = packed["inputs"], packed["data_samples"]
    assert inputs.shape == (6, 3, 3, 4, 4) and data_sample.num_views == 6
    assert data_sample.filename == "v.mp4" and data_sample.gt_label.tolist() == [2]
    for crop, x0 in enumerate((0, 3, 6)):  # left, middle, right; rows centred: 1..4
        for clip in range(2):
            view = inputs[crop * 2 + clip]
            assert view[0, :, 0, 0].tolist() == [clip * 3 + t for t in range(3)]
            assert view[1, 0, :, 0].tolist() == [1, 2, 3, 4]
            assert view[2, 0, 0, :].tolist() == list(range(x0, x0 + 4))
    # A single view packs as (3, T, H, W).
    single = PackVideoInputs()({"imgs": frames[:3], "clip_len": 3, "num_clips": 1})
    assert single["inputs"].shape == (3, 3, 6, 10) and single["data_samples"].num_views == 1
    with pytest.raises(ConfigError, match="larger"):
        ThreeCrop(8)({"imgs": frames})


# ----------------------------------------------------------------------------- datasets


def train_pipeline(clip_len=8, **sampler):
    return [
        dict(type="SampleFrames", clip_len=clip_len, frame_interval=2, **sampler),
        dict(type="DecodeFrames"),
        dict(type="VideoAlbu", transforms=[dict(type="RandomResizedCrop", size=[24, 24])]),
        dict(type="PackVideoInputs"),
    ]


def torch_equal(a, b):
    return bool((a["inputs"] == b["inputs"]).all()) and np.array_equal(
        a["data_samples"].frame_inds, b["data_samples"].frame_inds)


def test_video_list_dataset_end_to_end(dataset_root):
    ds = DATASETS.build(dict(type="VideoListDataset", data_root=dataset_root, ann_file="train.txt",
                             num_classes=4, pipeline=train_pipeline()))
    assert len(ds) == 8 and ds.metainfo["classes"] == ("left", "right", "up", "down")
    info = ds.get_data_info(5)
    assert info["filename"] == os.path.join(dataset_root, "train", "up", "up_0001.mp4")
    assert info["gt_label"] == 2 and info["total_frames"] == 20
    item = ds[5]
    assert item["inputs"].shape == (3, 8, 24, 24) and item["inputs"].dtype.__str__() == "torch.uint8"
    assert item["data_samples"].gt_label.tolist() == [2] and item["data_samples"].num_views == 1
    # Seeded: the same seed gives the same frames and crop, another seed other ones.
    first = ds[SeededIndex(5, seed=11)]
    assert torch_equal(first, ds[SeededIndex(5, seed=11)])
    assert not all(torch_equal(first, ds[SeededIndex(5, seed=s)]) for s in (12, 13))

    test = VideoListDataset(dataset_root, ann_file="val.txt", test_mode=True, pipeline=[
        dict(type="SampleFrames", clip_len=4, frame_interval=2, num_clips=2, test_mode=True),
        dict(type="DecodeFrames"),
        dict(type="VideoAlbu", transforms=[dict(type="SmallestMaxSize", max_size=28, interpolation="area")]),
        dict(type="ThreeCrop", crop_size=28),
        dict(type="PackVideoInputs"),
    ])
    item = test[3]
    assert item["inputs"].shape == (6, 3, 4, 28, 28) and item["data_samples"].num_views == 6
    # The decoded frames are the sampled ones: view 0 (first crop of the first clip) is frames
    # 0, 2, 4, 6 of the video; 32 px frames resized to 28 px and cropped to 28 px whole.
    frames = full_decode(os.path.join(dataset_root, "val", "down", "down_0000.mp4"))
    expected = np.stack([cv2.resize(f, (28, 28), interpolation=cv2.INTER_AREA) for f in frames[[0, 2, 4, 6]]])
    got = item["inputs"][0].permute(1, 2, 3, 0).numpy()
    assert np.array_equal(got, expected)


def test_data_prefix_and_given_classes(dataset_root, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "mine.txt").write_text("left/left_0000.mp4 0\nright/right_0001.mp4 1\n")
    os.symlink(os.path.join(dataset_root, "train"), str(lists / "videos"))
    ds = VideoListDataset(str(lists), ann_file="mine.txt", data_prefix=dict(video="videos"),
                          classes=["l", "r"], pipeline=train_pipeline(clip_len=2))
    assert ds.metainfo["classes"] == ("l", "r")
    assert ds.get_data_info(1)["filename"] == os.path.join(str(lists), "videos", "right/right_0001.mp4")
    assert ds[1]["inputs"].shape == (3, 2, 24, 24)
    # Without names, labels 0..max are named class_i.
    assert VideoListDataset(str(lists), ann_file="mine.txt", data_prefix="videos").metainfo["classes"] == (
        "class_0", "class_1")


def write_list(root, text, name="train.txt"):
    path = os.path.join(root, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_list_errors_name_file_and_line(tmp_path):
    root = str(tmp_path)
    path = write_list(root, "a.mp4 0\n\nb.mp4 7\n")
    with pytest.raises(DataError, match=rf"{path}, line 3: label 7 is out of range \(expected 0\.\.3"):
        VideoListDataset(root, num_classes=4)
    write_list(root, "a.mp4 0\nb.mp4\n")
    with pytest.raises(DataError, match=rf"{path}, line 2: expected `relative/path.mp4 label`"):
        VideoListDataset(root)
    write_list(root, "a.mp4 zero\n")
    with pytest.raises(DataError, match=rf"{path}, line 1: the label 'zero' is not an integer"):
        VideoListDataset(root)
    write_list(root, "a.mp4 -1\n")
    with pytest.raises(DataError, match="line 1: label -1 is out of range"):
        VideoListDataset(root)
    with pytest.raises(DataError, match="list file not found"):
        VideoListDataset(root, ann_file="val.txt")
    with pytest.raises(ConfigError, match="data_root"):
        VideoListDataset(None)
    # classes.txt fixes the class count: a label beyond it is named with its line too.
    write_list(root, "x\ny\n", "classes.txt")
    write_list(root, "a.mp4 0\nb.mp4 2\n")
    with pytest.raises(DataError, match=rf"{path}, line 2: label 2 is out of range"):
        VideoListDataset(root)
    with pytest.raises(ConfigError, match="num_classes is 3"):
        VideoListDataset(root, num_classes=3)


def bad_videos(root, dataset_root):
    """A list of one good video, a missing one, garbage bytes, a cut-off file and a cut-off file
    with its index at the front (which reads as a shorter video unless checked)."""
    good = os.path.join(dataset_root, "train", "left", "left_0000.mp4")
    os.symlink(good, os.path.join(root, "good.mp4"))
    with open(os.path.join(root, "garbage.mp4"), "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)
    data = open(good, "rb").read()
    with open(os.path.join(root, "cut.mp4"), "wb") as f:
        f.write(data[: len(data) // 2])
    # Remux with the index (moov) first, then cut off the second half of the frames.
    faststart = os.path.join(root, "faststart_full.mp4")
    with av.open(good) as src, av.open(faststart, "w", options={"movflags": "faststart"}) as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.size:
                packet.stream = stream
                dst.mux(packet)
    data = open(faststart, "rb").read()
    with open(os.path.join(root, "faststart_cut.mp4"), "wb") as f:
        f.write(data[: int(len(data) * 0.6)])
    names = ["good.mp4", "missing.mp4", "garbage.mp4", "cut.mp4", "faststart_cut.mp4"]
    write_list(root, "".join(f"{n} 0\n" for n in names))
    return names


def test_bad_videos_are_named(tmp_path, dataset_root):
    root = str(tmp_path)
    names = bad_videos(root, dataset_root)
    ds = VideoListDataset(root, pipeline=train_pipeline(clip_len=2), test_mode=True)
    assert ds[0]["inputs"].shape == (3, 2, 24, 24)
    messages = {
        "missing.mp4": r"video file not found: .*missing\.mp4 \(listed in .*train\.txt, line 2\)",
        "garbage.mp4": r"cannot open video .*garbage\.mp4",
        "cut.mp4": r"cannot open video .*cut\.mp4",
        "faststart_cut.mp4": r"faststart_cut\.mp4 is truncated: its header lists 20 frames",
    }
    for i, name in enumerate(names[1:], start=1):
        with pytest.raises(DataError, match=messages[name]):
            ds[i]
    # The faststart remux itself is fine and reads as the original.
    good = read_video_frames(os.path.join(root, "good.mp4"), range(20))
    assert np.array_equal(read_video_frames(os.path.join(root, "faststart_full.mp4"), range(20)), good)


def test_bad_videos_skipped_in_training_when_configured(tmp_path, dataset_root, monkeypatch):
    import vitasks.data.imagenet as imagenet

    warnings = []
    monkeypatch.setattr(imagenet, "print_log", lambda msg, **kwargs: warnings.append(msg))
    root = str(tmp_path)
    bad_videos(root, dataset_root)
    ds = VideoListDataset(root, pipeline=train_pipeline(clip_len=2), skip_bad_samples=True)
    item = ds[SeededIndex(4, seed=1)]  # the cut-off file: another (good) sample comes back
    assert item["data_samples"].filename.endswith("good.mp4")
    assert any("skipping a bad sample" in w and "faststart_cut.mp4" in w for w in warnings)
    strict = VideoListDataset(root, pipeline=train_pipeline(clip_len=2))
    with pytest.raises(DataError, match="skip_bad_samples"):
        strict[3]
    # Evaluation never skips (it would change the metric's denominator).
    evaluation = VideoListDataset(root, pipeline=train_pipeline(clip_len=2), skip_bad_samples=True, test_mode=True)
    with pytest.raises(DataError, match=r"garbage\.mp4.*training only"):
        evaluation[2]


def test_too_short_video_under_a_sampler_that_cannot_loop(dataset_root):
    ds = VideoListDataset(dataset_root, ann_file="val.txt", test_mode=True, pipeline=[
        dict(type="SampleFrames", clip_len=8, frame_interval=3, test_mode=True, out_of_bound_opt="error"),
        dict(type="DecodeFrames"),
    ])
    with pytest.raises(DataError, match=r"left_0000\.mp4 has 20 frames, fewer than one clip needs"):
        ds[0]


def test_raw_frame_dataset(tmp_path):
    from PIL import Image

    root = tmp_path
    for name, count in (("clip_a", 5), ("clip_b", 3)):
        (root / "frames" / name).mkdir(parents=True)
        for i in range(1, count + 1):  # files numbered from 1
            Image.fromarray(np.full((8, 10, 3), i * 20 + (name == "clip_b"), np.uint8)).save(
                root / "frames" / name / f"f_{i:03d}.png")
    write_list(str(root), "clip_a 5 1\nclip_b 3 0\n")
    ds = RawFrameDataset(str(root), data_prefix="frames", filename_tmpl="f_{:03d}.png", pipeline=[
        dict(type="SampleFrames", clip_len=3, frame_interval=2, test_mode=True),
        dict(type="DecodeFrames"),
        dict(type="PackVideoInputs"),
    ])
    item = ds[0]
    # 5 frames, a clip of 3 every 2: frames 0, 2, 4 = files 1, 3, 5.
    assert item["inputs"][0, :, 0, 0].tolist() == [20, 60, 100]
    assert item["data_samples"].gt_label.tolist() == [1]
    # 3 frames: 0, 2 and 4 mod 3 = 1 (loop) = files 1, 3, 2.
    assert ds[1]["inputs"][0, :, 0, 0].tolist() == [21, 61, 41]
    path = write_list(str(root), "clip_a 5 1\nclip_b three 0\n")
    with pytest.raises(DataError, match=rf"{path}, line 2: expected `frame_dir total_frames label`"):
        RawFrameDataset(str(root))
    write_list(str(root), "clip_c 5 1\n")
    with pytest.raises(DataError, match=r"frame folder not found: .*clip_c \(listed in"):
        RawFrameDataset(str(root), data_prefix="frames", pipeline=[dict(type="DecodeFrames")])[0]
    with pytest.raises(ConfigError, match="filename_tmpl"):
        RawFrameDataset(str(root), filename_tmpl="img_{x}.jpg")


def test_pipeline_on_a_bare_video_file(dataset_root):
    # Inference on one file: no dataset, the sampler probes the frame count.
    from mmengine.dataset import Compose

    from vitasks.data.imagenet import build_pipeline

    pipeline = Compose(build_pipeline([
        dict(type="SampleFrames", clip_len=4, frame_interval=5, test_mode=True),
        dict(type="DecodeFrames"),
        dict(type="PackVideoInputs"),
    ], "test"))
    path = os.path.join(dataset_root, "val", "up", "up_0000.mp4")
    out = pipeline({"filename": path})
    assert out["inputs"].shape == (3, 4, 32, 32)
    # 20 frames, a clip spans 3 x 5 + 1 = 16: the middle start is (20 - 16) // 2 = 2.
    assert out["data_samples"].frame_inds.tolist() == [2, 7, 12, 17]
    assert out["data_samples"].total_frames == 20


# ----------------------------------------------------------------------------- generator


def test_generator_is_deterministic_and_balanced(tmp_path, dataset_root):
    again = str(tmp_path / "again")
    make_video_dataset(again, seed=3, train_per_class=2, val_per_class=1, size=32, num_frames=20,
                       keyframe_interval=6)
    files = sorted(os.path.relpath(os.path.join(d, f), dataset_root)
                   for d, _, fs in os.walk(dataset_root) for f in fs)
    assert files == sorted(os.path.relpath(os.path.join(d, f), again) for d, _, fs in os.walk(again) for f in fs)
    for rel in files:
        with open(os.path.join(dataset_root, rel), "rb") as a, open(os.path.join(again, rel), "rb") as b:
            assert a.read() == b.read(), rel
    for split, per_class in (("train.txt", 2), ("val.txt", 1)):
        labels = [int(line.split()[1]) for line in open(os.path.join(dataset_root, split))]
        assert np.bincount(labels).tolist() == [per_class] * 4
    assert open(os.path.join(dataset_root, "classes.txt")).read().split() == ["left", "right", "up", "down"]
    assert json.load(open(os.path.join(dataset_root, "synthetic.json")))["num_frames"] == 20
    other = str(tmp_path / "other")
    make_video_dataset(other, seed=4, train_per_class=1, val_per_class=1, size=32, num_frames=4)
    assert open(os.path.join(other, "train", "up", "up_0000.mp4"), "rb").read() != open(
        os.path.join(dataset_root, "train", "up", "up_0000.mp4"), "rb").read()


def test_generated_bytes_do_not_depend_on_the_heap(tmp_path, dataset_root):
    """The same dataset written by a fresh process whose fresh and freed heap memory is filled with
    a pattern (glibc's MALLOC_PERTURB_) has the same bytes. x264's AVX-512 assembly reads
    uninitialised memory, so without ``asm=0`` on an AVX-512 machine the bytes of some clips
    change with the pattern (on other CPUs this cannot fail)."""
    import subprocess
    import sys

    again = str(tmp_path / "perturbed")
    code = ("from vitasks.data.synthetic.video import make_video_dataset\n"
            f"make_video_dataset({again!r}, seed=3, train_per_class=2, val_per_class=1, size=32, "
            "num_frames=20, keyframe_interval=6)\n")
    env = dict(os.environ, MALLOC_PERTURB_="85", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    clips = [line.split()[0] for split in ("train.txt", "val.txt") for line in open(os.path.join(dataset_root, split))]
    assert len(clips) == 12
    changed = [rel for rel in clips
               if open(os.path.join(dataset_root, rel), "rb").read() != open(os.path.join(again, rel), "rb").read()]
    assert changed == []


def estimated_motion(frames):
    """The whole-pixel shift (dx, dy) that best carries each frame difference onto the next one
    (by correlation): the direction the changes move in, whatever moves."""
    diffs = np.diff(frames.astype(np.float32).mean(axis=-1), axis=0)
    scores = {
        (dx, dy): sum(float((diffs[t + 1] * np.roll(diffs[t], (dy, dx), axis=(0, 1))).sum())
                      for t in range(len(diffs) - 1))
        for dx in range(-3, 4) for dy in range(-3, 4)
    }
    return max(scores, key=scores.get)


def test_generated_motion_is_the_class_direction():
    agree, total = 0, 0
    for k, (name, (dx, dy)) in enumerate(DIRECTIONS.items()):
        for i in range(3):
            frames = render_clip(np.random.default_rng([5, k, i]), (dx, dy), 32, 10, (1, 2))
            mx, my = estimated_motion(frames)
            agree += int(np.sign(mx) == dx and np.sign(my) == dy)
            total += 1
    assert agree >= total - 2, f"{agree} of {total} clips move in their class direction"


def test_write_mp4_checks_sides(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_mp4(str(tmp_path / "odd.mp4"), np.zeros((2, 31, 32, 3), np.uint8))


def test_missing_pyav_is_a_clear_config_error_never_skipped(dataset_root, monkeypatch):
    import sys

    ds = VideoListDataset(dataset_root, pipeline=train_pipeline(clip_len=2), skip_bad_samples=True)
    monkeypatch.setattr(video_io, "_index_cache", type(video_io._index_cache)())
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now fails
    with pytest.raises(ConfigError, match=r"needs PyAV.*pip install 'vitasks\[video\]'"):
        ds[SeededIndex(0, seed=1)]


def test_config_validation_checks_video_albu_names_against_albumentations(tmp_path):
    from mmengine.config import Config

    from vitasks.config import validate_config

    def config(name):
        cfg = Config(dict(train_dataloader=dict(dataset=dict(
            type="VideoListDataset", data_root=str(tmp_path),
            pipeline=[dict(type="SampleFrames", clip_len=8), dict(type="DecodeFrames"),
                      dict(type="VideoAlbu", transforms=[dict(type=name, size=[8, 8])]),
                      dict(type="PackVideoInputs")]))))
        cfg.filename = "video.yaml"
        return cfg

    validate_config(config("RandomResizedCrop"))
    with pytest.raises(ConfigError, match="'RandomResizedCrpo' is not a transform in albumentations"):
        validate_config(config("RandomResizedCrpo"))
