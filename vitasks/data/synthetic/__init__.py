"""Small generated datasets, written in the standard layouts the real datasets use.

Each kind is a function ``make_<kind>_dataset(out_dir, seed=0, ...)`` in its own module; the
demo configs under ``configs/demo/`` read what these write.
"""

import importlib

# kind -> (module, function): imported on demand so one kind's dependencies don't burden another.
KINDS = {
    "cls": ("vitasks.data.synthetic.cls", "make_cls_dataset"),
    "seg": ("vitasks.data.synthetic.seg", "make_seg_dataset"),
    "det": ("vitasks.data.synthetic.det", "make_det_dataset"),
    "video": ("vitasks.data.synthetic.video", "make_video_dataset"),
}


def make_synthetic(kind: str, out_dir: str, seed: int = 0, style: str = "random"):
    """Write the generated dataset ``kind`` into ``out_dir`` in the appearance ``style``
    (``"random"``, ``"plain"`` or ``"photo"``, for every kind: see ``drawing.STYLES``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic dataset kind {kind!r}; expected one of {sorted(KINDS)}")
    module_name, function_name = KINDS[kind]
    make = getattr(importlib.import_module(module_name), function_name)
    return make(out_dir, seed=seed, style=style)
