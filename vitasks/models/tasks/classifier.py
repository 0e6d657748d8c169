"""Image classifier: backbone (+ optional neck) + classification head."""

from vitasks.models.tasks.base import HeadTaskModel
from vitasks.registry import MODELS


@MODELS.register_module()
class ImageClassifier(HeadTaskModel):
    """Classifier following mmengine's BaseModel protocol.

    ``forward(inputs, data_samples, mode)``:

    - ``"tensor"``: logits ``(N, K)`` for already-normalised inputs (the public contract
      ``init_model(cfg)(x, mode="tensor")``);
    - ``"loss"``: ``{"loss": ...}``, from hard labels (``gt_label``) or the soft targets
      (``gt_score``) that Mixup/CutMix leave in the samples;
    - ``"predict"``: the samples with ``pred_score`` (softmax) and ``pred_label`` filled.

    Args:
        backbone: Backbone config, e.g. ``{type: VisionTransformer, ...}`` returning a tuple whose
            last element is the pooled feature ``(N, C)``.
        head: Head config (``LinearClsHead`` or ``MLPClsHead``).
        neck: Optional neck config.
        data_preprocessor: Preprocessor config; default ``ClsDataPreprocessor()`` (ImageNet
            mean/std).
        init_cfg: mmengine initialisation config.
    """

    default_preprocessor = dict(type="ClsDataPreprocessor")
