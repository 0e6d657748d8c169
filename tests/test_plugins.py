"""Plugins: the config's `plugins:` list, installed entry points, and the example plugin."""

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vitasks import plugins
from vitasks.config import load_config, validate_config
from vitasks.errors import ConfigError
from vitasks.registry import MODELS

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "plugins" / "cosine_head"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def plugin_source(class_name: str, extra: str = "") -> str:
    return textwrap.dedent(f"""
        from vitasks.registry import MODELS

        CALLS = []

        @MODELS.register_module()
        class {class_name}:
            def __init__(self, k: int = 1):
                self.k = k
        {extra}
    """)


@pytest.fixture
def cleanup():
    """Forget registered names and imported modules after a test."""
    names, modules = [], []
    yield names, modules
    for name in names:
        MODELS._module_dict.pop(name, None)
    for module in modules:
        sys.modules.pop(module, None)


def test_register_all_modules_imports_every_sub_package():
    plugins.register_all_modules()
    for name in plugins.SUBPACKAGES:
        assert name in sys.modules


def test_register_all_modules_can_set_the_default_scope():
    from mmengine.registry import DefaultScope

    plugins.register_all_modules(init_default_scope=True)
    assert DefaultScope.get_current_instance().scope_name == "vitasks"


def test_config_plugins_by_module_name(tmp_path, monkeypatch, cleanup):
    names, modules = cleanup
    names.append("PlugByName")
    modules.append("vt_plug_by_name")
    write(tmp_path / "lib", "vt_plug_by_name.py", plugin_source("PlugByName"))
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    cfg = load_config(write(tmp_path, "exp.yaml", "plugins: [vt_plug_by_name]\n"))
    assert "PlugByName" not in MODELS.module_dict
    imported = plugins.import_plugins(cfg, entry_points=False)
    assert imported == ["vt_plug_by_name"]
    assert MODELS.build(dict(type="PlugByName", k=3)).k == 3


def test_config_plugins_by_path_relative_to_the_config(tmp_path, cleanup):
    names, modules = cleanup
    names += ["PlugFile", "PlugPackage"]
    modules += ["vt_plug_file", "vt_plug_pkg"]
    write(tmp_path, "code/vt_plug_file.py", plugin_source("PlugFile"))
    write(tmp_path, "code/vt_plug_pkg/__init__.py", "from .impl import PlugPackage\n")
    write(tmp_path, "code/vt_plug_pkg/impl.py", plugin_source("PlugPackage"))
    cfg = load_config(write(tmp_path, "configs/exp.yaml", """
        plugins:
          - ../code/vt_plug_file.py
          - ../code/vt_plug_pkg
    """))
    assert plugins.import_plugins(cfg, entry_points=False) == ["vt_plug_file", "vt_plug_pkg"]
    assert {"PlugFile", "PlugPackage"} <= set(MODELS.module_dict)
    # importing again is a no-op (no duplicate registration)
    assert plugins.import_plugins(cfg, entry_points=False) == ["vt_plug_file", "vt_plug_pkg"]


def test_missing_plugin_module_is_a_config_error(tmp_path):
    cfg = load_config(write(tmp_path, "exp.yaml", "plugins: [vt_no_such_plugin_xyz]\n"))
    with pytest.raises(ConfigError) as err:
        plugins.import_plugins(cfg, entry_points=False)
    assert "vt_no_such_plugin_xyz" in str(err.value)
    assert "exp.yaml" in str(err.value)
    cfg = load_config(write(tmp_path, "exp2.yaml", "plugins: [./nothing_here.py]\n"))
    with pytest.raises(ConfigError, match="nothing_here.py' not found"):
        plugins.import_plugins(cfg, entry_points=False)
    cfg = load_config(write(tmp_path, "exp3.yaml", "plugins: {a: 1}\n"))
    with pytest.raises(ConfigError, match="plugins must be a list"):
        plugins.import_plugins(cfg, entry_points=False)


def make_distribution(root: Path, dist: str, entry_points: str, modules: dict) -> None:
    """An installed distribution as importlib.metadata sees it: a *.dist-info folder with
    METADATA and entry_points.txt next to the modules, on sys.path."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for name, source in modules.items():
        (root / f"{name}.py").write_text(source)


def test_entry_point_plugins_are_discovered(tmp_path, monkeypatch, cleanup):
    names, modules = cleanup
    names += ["PlugEntryModule", "PlugEntryFunc"]
    modules += ["vt_ep_module", "vt_ep_func"]
    register_fn = """
def register():
    CALLS.append(1)
    MODELS.register_module(name="PlugEntryFunc", module=PlugEntryFuncImpl)
"""
    make_distribution(
        tmp_path, "vt_fake_plugin",
        """
        [vitasks.plugins]
        by_module = vt_ep_module
        by_function = vt_ep_func:register

        [console_scripts]
        unrelated = vt_ep_func:nothing
        """,
        {
            "vt_ep_module": plugin_source("PlugEntryModule"),
            # a module that registers only when its function is called
            "vt_ep_func": plugin_source("PlugEntryFuncImpl").replace(
                "@MODELS.register_module()", "") + register_fn,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = {ep.name for ep in plugins.entry_point_plugins()}
    assert {"by_module", "by_function"} <= found

    imported = plugins.import_plugins()
    assert {"vt_ep_module", "vt_ep_func:register"} <= set(imported)
    assert "PlugEntryModule" in MODELS.module_dict
    assert "PlugEntryFunc" in MODELS.module_dict
    plugins.import_plugins()  # a second call does not run register() again
    assert sys.modules["vt_ep_func"].CALLS == [1]


def test_broken_entry_point_is_a_config_error(tmp_path, monkeypatch):
    make_distribution(tmp_path, "vt_broken_plugin",
                      "[vitasks.plugins]\nbroken = vt_missing_module_abc\n", {})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        plugins.import_plugins()
    msg = str(err.value)
    assert "broken = vt_missing_module_abc" in msg and "vt_broken_plugin" in msg


# ------------------------------------------------------------------------------------------
# The example plugin in plugins/cosine_head
# ------------------------------------------------------------------------------------------


def test_example_plugin_declares_its_entry_point():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    group = meta["project"]["entry-points"]["vitasks.plugins"]
    assert group == {"cosine_head": "vitasks_cosine_head"}


@pytest.fixture
def cosine_head_config(tmp_path):
    path = write(tmp_path, "exp.yaml", f"""
        plugins: ["{EXAMPLE / 'vitasks_cosine_head'}"]
        num_classes: 3
        model:
          type: ImageClassifier
          head: {{type: CosineClsHead, num_classes: "${{num_classes}}", in_channels: 8,
                 scale: 10.0}}
    """)
    cfg = load_config(path)
    already = "vitasks_cosine_head" in sys.modules
    plugins.import_plugins(cfg, entry_points=False)
    yield cfg
    if not already:
        MODELS._module_dict.pop("CosineClsHead", None)
        for name in [m for m in sys.modules if m.startswith("vitasks_cosine_head")]:
            sys.modules.pop(name)


def test_example_cosine_head_computes_scaled_cosines(cosine_head_config):
    head = MODELS.build(cosine_head_config.model.head)
    feats = torch.randn(5, 8, dtype=torch.float64)
    head = head.double()
    logits = head(feats)
    assert logits.shape == (5, 3)
    w = head.fc.weight.detach()
    for i in range(5):
        for k in range(3):
            f, p = feats[i].tolist(), w[k].tolist()
            dot = sum(a * b for a, b in zip(f, p))
            cos = dot / (math.sqrt(sum(a * a for a in f)) * math.sqrt(sum(b * b for b in p)))
            # rel 1e-6: the scale is stored in float32
            assert logits[i, k].item() == pytest.approx(10.0 * cos, rel=1e-6)
    assert logits.abs().max() <= 10.0 + 1e-5
    # only a learnable scale is a parameter
    assert "log_scale" not in dict(head.named_parameters())
    learn = MODELS.build(dict(type="CosineClsHead", num_classes=3, in_channels=8,
                              learnable_scale=True))
    assert "log_scale" in dict(learn.named_parameters())


def test_example_cosine_head_trains_with_the_shared_loss(cosine_head_config):
    from vitasks.structures import DataSample

    head = MODELS.build(cosine_head_config.model.head)
    samples = [DataSample(), DataSample()]
    samples[0].gt_label = torch.tensor([0])
    samples[1].gt_label = torch.tensor([2])
    losses = head.loss(torch.randn(2, 8), samples)
    losses["loss"].backward()
    assert head.fc.weight.grad is not None and torch.isfinite(losses["loss"])
    preds = head.predict(torch.randn(2, 8))
    assert preds[0].pred_score.shape == (3,)


def test_example_plugin_config_validates(cosine_head_config):
    validate_config(cosine_head_config)
    cosine_head_config.model.head.temperature = 2
    with pytest.raises(ConfigError, match="model.head.temperature: CosineClsHead has no argument"):
        validate_config(cosine_head_config)


# ------------------------------------------------------------------------------------------
# Plugin errors, a plugin that trains, and `vitasks list` providers
# ------------------------------------------------------------------------------------------


def test_plugin_with_a_missing_dependency_names_both_and_the_config(tmp_path, monkeypatch):
    write(tmp_path / "lib", "vt_plug_needs_dep.py", "import vt_dependency_not_installed_q\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    cfg = load_config(write(tmp_path, "needs.yaml", "plugins: [vt_plug_needs_dep]\n"))
    with pytest.raises(ConfigError) as err:
        plugins.import_plugins(cfg, entry_points=False)
    msg = str(err.value)
    assert "needs.yaml" in msg and "'vt_plug_needs_dep'" in msg
    assert "vt_dependency_not_installed_q" in msg
    assert "vt_plug_needs_dep" not in sys.modules


def test_plugin_with_a_syntax_error_is_a_config_error(tmp_path):
    write(tmp_path, "code/vt_plug_typo.py", "def broken(:\n    pass\n")
    cfg = load_config(write(tmp_path, "typo.yaml", "plugins: [code/vt_plug_typo.py]\n"))
    with pytest.raises(ConfigError) as err:
        plugins.import_plugins(cfg, entry_points=False)
    msg = str(err.value)
    assert "typo.yaml" in msg and "vt_plug_typo.py" in msg and "line 1" in msg


def test_two_plugins_registering_one_name_are_named(tmp_path, monkeypatch, cleanup):
    names, modules = cleanup
    names.append("PlugClash")
    modules += ["vt_clash_first", "vt_clash_second"]
    write(tmp_path / "lib", "vt_clash_first.py", plugin_source("PlugClash"))
    write(tmp_path / "lib", "vt_clash_second.py", plugin_source("PlugClash"))
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    cfg = load_config(write(tmp_path, "clash.yaml", "plugins: [vt_clash_first, vt_clash_second]\n"))
    with pytest.raises(ConfigError) as err:
        plugins.import_plugins(cfg, entry_points=False)
    msg = str(err.value)
    assert "clash.yaml" in msg and "'PlugClash'" in msg
    assert "'vt_clash_second'" in msg and "'vt_clash_first'" in msg
    assert "registry 'model'" in msg
    # the first one stays registered, the second one is not half-imported
    assert MODELS.module_dict["PlugClash"].__module__ == "vt_clash_first"
    assert "vt_clash_second" not in sys.modules


def test_entry_point_plugin_clashing_with_vitasks_is_named(tmp_path, monkeypatch):
    from vitasks.models.heads.seg_heads import FCNHead

    source = "from vitasks.registry import MODELS\n\n@MODELS.register_module()\nclass FCNHead:\n    pass\n"
    make_distribution(tmp_path, "vt_clash_dist", "[vitasks.plugins]\nclash = vt_ep_clash\n",
                      {"vt_ep_clash": source})
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ConfigError) as err:
            plugins.import_plugins()
    finally:
        sys.modules.pop("vt_ep_clash", None)
    msg = str(err.value)
    assert "clash = vt_ep_clash" in msg and "vt_clash_dist" in msg
    assert "'vt_ep_clash'" in msg and "'vitasks.models.heads.seg_heads'" in msg
    assert MODELS.module_dict["FCNHead"] is FCNHead


PLUGIN_THAT_TRAINS = '''
"""A plugin written outside vitasks: data, model and metric of a tiny 2-class problem."""
import torch
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from vitasks.registry import DATASETS, METRICS, MODELS


@DATASETS.register_module()
class TmpPlugPoints(Dataset):
    """Points in the plane, labelled by the sign of x + y."""

    def __init__(self, length: int = 32, seed: int = 0):
        self.x = torch.randn(length, 2, generator=torch.Generator().manual_seed(seed))
        self.y = (self.x.sum(1) > 0).long()
        self.metainfo = dict(classes=("neg", "pos"))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, idx):
        return dict(inputs=self.x[idx], data_samples=int(self.y[idx]))


@MODELS.register_module()
class TmpPlugLinear(BaseModel):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, inputs, data_samples=None, mode="tensor"):
        logits = self.fc(torch.stack(list(inputs)))
        if mode == "tensor":
            return logits
        labels = torch.as_tensor(data_samples)
        if mode == "loss":
            return dict(loss=F.cross_entropy(logits, labels))
        return [dict(pred=int(p), gt=int(g)) for p, g in zip(logits.argmax(1), labels)]


@METRICS.register_module()
class TmpPlugAccuracy(BaseMetric):
    default_prefix = "tmpplug"

    def process(self, data_batch, data_samples):
        self.results += [float(s["pred"] == s["gt"]) for s in data_samples]

    def compute_metrics(self, results):
        return dict(acc=100.0 * sum(results) / len(results))
'''


def test_plugin_in_a_temporary_folder_trains_and_evaluates(tmp_path):
    import json

    from vitasks.engine import launch

    write(tmp_path, "my_code/vt_tmp_plug.py", PLUGIN_THAT_TRAINS)
    loader = """
      batch_size: 8
      num_workers: 0
      dataset: {{type: TmpPlugPoints, length: 32, seed: {seed}}}
      sampler: {{type: DefaultSampler, shuffle: {shuffle}}}
    """
    config = write(tmp_path, "configs/tmp_plug.yaml", f"""
default_scope: vitasks
plugins: [../my_code/vt_tmp_plug.py]
model: {{type: TmpPlugLinear}}
train_dataloader:{loader.format(seed=0, shuffle='true')}
train_cfg: {{by_epoch: true, max_epochs: 5, val_interval: 5}}
val_dataloader:{loader.format(seed=1, shuffle='false')}
val_cfg: {{}}
val_evaluator: {{type: TmpPlugAccuracy}}
test_dataloader:{loader.format(seed=1, shuffle='false')}
test_cfg: {{}}
test_evaluator: {{type: TmpPlugAccuracy}}
optim_wrapper: {{optimizer: {{type: SGD, lr: 0.5}}}}
default_hooks: {{checkpoint: {{type: CheckpointHook, interval: 5}}}}
randomness: {{seed: 0}}
log_level: WARNING
""")
    try:
        runner = launch.train(config, work_dir=str(tmp_path / "wd"))
        ckpt = (tmp_path / "wd" / "last_checkpoint").read_text().strip()
        metrics = launch.test(config, ckpt, work_dir=str(tmp_path / "wd_test"))
        # the plugin's metric, on the test set, from the trained weights
        points = sys.modules["vt_tmp_plug"].TmpPlugPoints(length=32, seed=1)
        with torch.no_grad():
            pred = (points.x @ runner.model.fc.weight.T + runner.model.fc.bias).argmax(1)
        expected = 100.0 * (pred == points.y).float().mean().item()
        assert metrics == {"tmpplug/acc": pytest.approx(expected)}
        assert metrics["tmpplug/acc"] >= 90.0  # a linear rule: learnt (zero init scores 50%)
        assert json.loads((tmp_path / "wd_test" / "metrics.json").read_text()) == metrics
    finally:
        for name in ("TmpPlugPoints", "TmpPlugLinear", "TmpPlugAccuracy"):
            for registry in (MODELS, __import__("vitasks.registry").registry.DATASETS,
                             __import__("vitasks.registry").registry.METRICS):
                registry._module_dict.pop(name, None)
        sys.modules.pop("vt_tmp_plug", None)


def test_list_names_the_package_of_each_component(tmp_path, monkeypatch, capsys, cleanup):
    from vitasks import cli

    names, modules = cleanup
    names += ["PlugListedByConfig", "PlugListedByDist"]
    modules += ["vt_list_cfg", "vt_list_dist"]
    write(tmp_path / "lib", "vt_list_cfg.py", plugin_source("PlugListedByConfig"))
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    plugins.import_plugins(load_config(write(tmp_path, "listing.yaml", "plugins: [vt_list_cfg]\n")),
                           entry_points=False)
    make_distribution(tmp_path / "site", "vt_list_dist", "[vitasks.plugins]\nlisted = vt_list_dist\n",
                      {"vt_list_dist": plugin_source("PlugListedByDist")})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    assert cli.main(["list", "models"]) == 0
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("  ")}
    assert rows["PlugListedByConfig"] == ["vt_list_cfg", "plugin vt_list_cfg (config listing.yaml)"]
    assert rows["PlugListedByDist"] == ["vt_list_dist", "vt_list_dist (entry point listed)"]
    assert rows["FCNHead"] == ["vitasks.models.heads.seg_heads", "vitasks"]
    assert plugins.provider_of("mmengine.hooks.checkpoint_hook") == "mmengine"
    assert plugins.provider_of("yaml") == "PyYAML"  # an installed distribution, by its name
