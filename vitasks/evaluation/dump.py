"""Prediction dumpers: metrics that write predictions to a file and return no numbers.

``tools/test.py --dump PATH`` appends the config's ``test_dump`` (e.g.
``{type: ClsPredictionDumper}``) to the test evaluator with ``out_path: PATH``.
"""

import json
import os
from typing import Optional, Sequence

from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log

from vitasks.errors import ConfigError
from vitasks.registry import METRICS

# Keys that name a sample's source file, in order of preference.
_FILE_KEYS = ("img_path", "video_path", "filename")


class PredictionDumper(BaseMetric):
    """What the dumpers share: the ``out_path`` that ``--dump PATH`` sets; no numbers reported."""

    default_prefix: Optional[str] = ""

    def __init__(self, out_path: Optional[str] = None, collect_device: str = "cpu",
                 prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        if not out_path:
            raise ConfigError(f"{type(self).__name__}: `out_path` is missing (tools/test.py --dump PATH sets it)")
        self.out_path = str(out_path)


@METRICS.register_module()
class ClsPredictionDumper(PredictionDumper):
    """Writes one JSON line per sample: ``{"file", "pred", "scores"}``.

    ``file`` is the image (or video) path relative to the data root when it lies under it,
    otherwise as given; ``pred`` the predicted class index; ``scores`` the softmax scores.

    Args:
        out_path: The JSON-lines file to write (folders are created).
        data_root: Root that paths are made relative to; by default the dataset's
            ``data_root`` (from its metainfo).
        collect_device: ``cpu`` or ``gpu`` for gathering results across processes.
    """

    def __init__(
        self,
        out_path: Optional[str] = None,
        data_root: Optional[str] = None,
        collect_device: str = "cpu",
    ) -> None:
        super().__init__(out_path, collect_device=collect_device)
        self.data_root = data_root

    def _relative(self, path: str) -> str:
        root = self.data_root or (self.dataset_meta or {}).get("data_root")
        if root:
            rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
            if not rel.startswith(os.pardir + os.sep) and rel != os.pardir:
                return rel.replace(os.sep, "/")
        return path

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            file = next((sample[k] for k in _FILE_KEYS if k in sample), None)
            score = sample["pred_score"].detach().float().cpu()
            label = sample.get("pred_label")
            pred = int(label.reshape(-1)[0]) if label is not None else int(score.argmax())
            self.results.append({"file": file, "pred": pred, "scores": score.tolist()})

    def compute_metrics(self, results: list) -> dict:
        folder = os.path.dirname(os.path.abspath(self.out_path))
        os.makedirs(folder, exist_ok=True)
        with open(self.out_path, "w", encoding="utf-8") as f:
            for r in results:
                file = self._relative(r["file"]) if r["file"] is not None else None
                f.write(json.dumps({"file": file, "pred": r["pred"], "scores": r["scores"]}) + "\n")
        print_log(f"wrote {len(results)} predictions to {self.out_path}", logger="current")
        return {}
