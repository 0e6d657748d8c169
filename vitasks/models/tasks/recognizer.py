"""Video action recognizer: a video backbone + ``VideoClsHead`` (mmaction2's Recognizer3D)."""

from vitasks.models.tasks.base import HeadTaskModel
from vitasks.registry import MODELS


@MODELS.register_module()
class Recognizer(HeadTaskModel):
    """Clip classifier following mmengine's BaseModel protocol.

    The data preprocessor stacks the V views (clips x crops) of each video along the batch, so
    ``inputs`` is (N * V, 3, T, H, W), normalised, and each sample's metainfo says its
    ``num_views``. ``forward(inputs, data_samples, mode)``:

    - ``"tensor"``: logits (N, K) for already-normalised clips (N, 3, T, H, W), one row per clip
      (the public contract ``init_model(cfg)(x, mode="tensor")``);
    - ``"loss"``: ``{"loss": ...}``, every view trained on its video's label;
    - ``"predict"``: the samples with ``pred_score`` (K,) averaged over their views (the head's
      ``average_clips``: softmax probabilities or logits) and ``pred_label``.

    Args:
        backbone: backbone config, e.g. ``{type: VideoVisionTransformer, ...}``, returning a tuple
            whose last element is the pooled feature (N, C).
        head: head config (``VideoClsHead``).
        neck: optional neck config.
        data_preprocessor: preprocessor config; default ``VideoDataPreprocessor()``.
        init_cfg: mmengine initialisation config.
    """

    default_preprocessor = dict(type="VideoDataPreprocessor")
