"""The `vitasks` command: argument mapping onto the Python API, `list`, and error formatting."""

import subprocess
import sys
import types

import pytest

import vitasks.convert
from vitasks import cli
from vitasks.errors import ConfigError
from vitasks.registry import MODELS


class Recorder:
    """Records calls; optionally raises or returns something."""

    def __init__(self, result=None, error=None):
        self.calls = []
        self.result, self.error = result, error

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def launch(monkeypatch):
    """A stand-in for vitasks.engine.launch (the handlers import it by name)."""
    module = types.ModuleType("vitasks.engine.launch")
    module.train = Recorder()
    module.test = Recorder(result={"accuracy/top1": 87.5, "accuracy/top5": 99.25})
    monkeypatch.setitem(sys.modules, "vitasks.engine.launch", module)
    return module


@pytest.mark.parametrize("argv, expected", [
    (["cfg.yaml"],
     dict(work_dir=None, resume=None, amp=False, launcher="none", cfg_options=[])),
    (["cfg.yaml", "--resume"],
     dict(work_dir=None, resume="auto", amp=False, launcher="none", cfg_options=[])),
    (["cfg.yaml", "--resume", "w/epoch_3.pth", "--work-dir", "w", "--amp"],
     dict(work_dir="w", resume="w/epoch_3.pth", amp=True, launcher="none", cfg_options=[])),
    (["--local-rank=1", "cfg.yaml", "--launcher", "pytorch",
      "--cfg-options", "data_root=/d", "num_classes=7"],
     dict(work_dir=None, resume=None, amp=False, launcher="pytorch",
          cfg_options=["data_root=/d", "num_classes=7"])),
    (["cfg.yaml", "--local_rank", "0", "--launcher", "slurm"],
     dict(work_dir=None, resume=None, amp=False, launcher="slurm", cfg_options=[])),
])
def test_train_arguments(launch, argv, expected):
    assert cli.main(["train", *argv]) == 0
    assert launch.train.calls == [(("cfg.yaml",), expected)]


def test_train_rejects_unknown_launcher(launch, capsys):
    assert cli.main(["train", "cfg.yaml", "--launcher", "mpi"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert launch.train.calls == []


def test_test_arguments_and_metrics_table(launch, capsys):
    code = cli.main(["test", "cfg.yaml", "ckpt.pth", "--work-dir", "w", "--dump", "p.jsonl",
                     "--cfg-options", "test_dataloader.batch_size=2"])
    assert code == 0
    assert launch.test.calls == [(("cfg.yaml", "ckpt.pth"), dict(
        work_dir="w", dump="p.jsonl", amp=False, launcher="none", cfg_options=["test_dataloader.batch_size=2"]))]
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["metric", "value"]
    assert out[2].split() == ["accuracy/top1", "87.5000"]
    assert out[3].split() == ["accuracy/top5", "99.2500"]


def test_distributed_test_passes_the_launcher_and_prints_one_table(launch, capsys, monkeypatch):
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert cli.main(["test", "cfg.yaml", "ckpt.pth", "--launcher", "pytorch", "--local-rank=1"]) == 0
        assert launch.test.calls[-1][1]["launcher"] == "pytorch"
        assert ("accuracy/top1" in capsys.readouterr().out) == printed


def test_infer_arguments(monkeypatch, capsys):
    apis = types.ModuleType("vitasks.apis")
    apis.run_inference = Recorder(result=[{}, {}])
    monkeypatch.setitem(sys.modules, "vitasks.apis", apis)
    code = cli.main(["infer", "cfg.yaml", "ckpt.pth", "a.jpg", "b.png", "--out-dir", "out",
                     "--topk", "3", "--device", "cuda:0", "--cfg-options", "img_size=64"])
    assert code == 0
    expected = dict(device="cuda:0", topk=3, cfg_options=["img_size=64"])
    assert apis.run_inference.calls == [
        (("cfg.yaml", "ckpt.pth", ["a.jpg", "b.png"], "out"), expected)
    ]
    assert "2 input(s)" in capsys.readouterr().out
    apis.run_inference.calls.clear()
    assert cli.main(["infer", "cfg.yaml", "ckpt.pth", "a.jpg", "--out-dir", "o"]) == 0
    assert apis.run_inference.calls[0][1] == dict(device="cpu", topk=5, cfg_options=[])
    assert cli.main(["infer", "cfg.yaml", "ckpt.pth", "a.jpg"]) == 2  # --out-dir is required


_CONVERT_DEFAULTS = dict(img_size=None, num_classes=None, drop_head=False, drop_final_norm=False,
                         pool=None, num_heads=None, keep_pre_logits=False)


@pytest.mark.parametrize("extra, expected", [
    ([], _CONVERT_DEFAULTS),
    (["--img-size", "384"], dict(_CONVERT_DEFAULTS, img_size=(384, 384))),
    (["--img-size", "224", "320", "--num-classes", "10", "--drop-head", "--drop-final-norm"],
     dict(_CONVERT_DEFAULTS, img_size=(224, 320), num_classes=10, drop_head=True,
          drop_final_norm=True)),
    (["--pool", "mean", "--num-heads", "6", "--keep-pre-logits"],
     dict(_CONVERT_DEFAULTS, pool="mean", num_heads=6, keep_pre_logits=True)),
])
def test_convert_arguments(monkeypatch, extra, expected):
    convert = Recorder()
    monkeypatch.setattr(vitasks.convert, "convert_checkpoint", convert, raising=False)
    assert cli.main(["convert", "timm", "in.safetensors", "out.pth", *extra]) == 0
    assert convert.calls == [(("timm", "in.safetensors", "out.pth"), expected)]


def test_convert_rejects_bad_format_and_sizes(monkeypatch, capsys):
    convert = Recorder()
    monkeypatch.setattr(vitasks.convert, "convert_checkpoint", convert, raising=False)
    assert cli.main(["convert", "onnx", "a", "b"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["convert", "hf", "a", "b", "--img-size", "1", "2", "3"]) == 2
    assert "one or two numbers" in capsys.readouterr().err
    assert convert.calls == []


# ------------------------------------------------------------------------------------------
# list
# ------------------------------------------------------------------------------------------


class CliListedThing:
    pass


@pytest.fixture
def listed():
    MODELS.register_module(module=CliListedThing)
    yield
    MODELS._module_dict.pop("CliListedThing", None)


def sections(text):
    """{registry name: [component names]} from `vitasks list` output."""
    out, current = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            current = line.split()[0]
            out[current] = []
        elif line.strip() and line.strip() != "(none)":
            out[current].append(line.split()[0])
    return out


def test_list_prints_every_registry(listed, capsys):
    from vitasks.registry import ALL_REGISTRIES

    assert cli.main(["list"]) == 0
    found = sections(capsys.readouterr().out)
    assert list(found) == list(ALL_REGISTRIES)
    for name, registry in ALL_REGISTRIES.items():
        assert found[name] == sorted(registry.module_dict)
    assert "CliListedThing" in found["models"]


def test_list_one_registry_with_modules(listed, capsys):
    assert cli.main(["list", "models"]) == 0
    text = capsys.readouterr().out
    assert list(sections(text)) == ["models"]
    line = next(line for line in text.splitlines() if "CliListedThing" in line)
    assert line.split() == ["CliListedThing", __name__]


def test_list_unknown_registry(capsys):
    assert cli.main(["list", "modles"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitasks: error: unknown registry 'modles'")
    assert "models" in err and "transforms" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_vitasks_errors_print_one_line_and_exit_2(launch, capsys):
    launch.train.error = ConfigError("cfg.yaml: model.backbone.type: 'X' is not registered")
    assert cli.main(["train", "cfg.yaml"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "vitasks: error: cfg.yaml: model.backbone.type: 'X' is not registered\n"
    assert captured.out == ""


def test_malformed_cfg_option_fails_before_launch(launch, capsys):
    assert cli.main(["train", "cfg.yaml", "--cfg-options", "lr"]) == 2
    assert "vitasks: error: --cfg-options: expected KEY=VALUE, got 'lr'" in capsys.readouterr().err
    assert launch.train.calls == []


def test_real_config_error_through_the_cli(tmp_path, capsys):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    from vitasks.config import load_config

    def train(config, **kwargs):
        load_config(config, kwargs["cfg_options"])

    module = types.ModuleType("vitasks.engine.launch")
    module.train = train
    sys.modules["vitasks.engine.launch"], saved = module, sys.modules.get("vitasks.engine.launch")
    try:
        assert cli.main(["train", str(cfg)]) == 2
    finally:
        if saved is None:
            del sys.modules["vitasks.engine.launch"]
        else:
            sys.modules["vitasks.engine.launch"] = saved
    err = capsys.readouterr().err
    assert err.startswith("vitasks: error: ") and "evil.yaml, line 1" in err
    assert not marker.exists()


def test_other_exceptions_keep_their_traceback(launch):
    launch.train.error = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["train", "cfg.yaml"])


def test_help_and_usage_errors_return_codes(capsys):
    assert cli.main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["train"]) == 2
    assert "CONFIG" in capsys.readouterr().err.upper()


def test_console_entry_point_exit_status_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vitasks.cli", "train", "cfg.yaml", "--cfg-options", "=3"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("vitasks: error: --cfg-options: malformed key")
    assert "Traceback" not in proc.stderr
