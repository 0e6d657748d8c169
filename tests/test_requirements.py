"""The torch version setup.cfg declares is the lowest that has every torch feature the code uses.

Each feature: the release that introduced it (from PyTorch's release notes and pull requests)
and a check that the code does use it. The declared minimum must be the newest of those
releases: not lower (the code would fail on an older torch), not higher (users would be refused
a torch that works). The upper bound must admit every torch the project is tested with (CI's two
legs: 2.13.0 CPU, and 2.14.1 with torchvision 0.29.1) and stop before the next, untested release.
"""

import configparser
import inspect
import pathlib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

# CI's second leg (torch 2.14.1) runs these too (.ci/run).
pytestmark = pytest.mark.torch_leg

REPO = pathlib.Path(__file__).resolve().parents[1]
# The torch of each CI leg (.ci/run): tools/setup_env.sh pins both.
TESTED_TORCH = ("2.13.0", "2.14.1")
SETUP_ENV = REPO / "tools" / "setup_env.sh"


def _allowlist_has_named_entries() -> bool:
    from vitasks.engine.checkpoint import SAFE_GLOBALS

    return any(isinstance(entry, tuple) for entry in SAFE_GLOBALS)


def _checkpoint_loading_uses_safe_globals() -> bool:
    from vitasks.engine import checkpoint

    return "torch.serialization.safe_globals(" in inspect.getsource(checkpoint)


def _amp_uses_device_grad_scaler() -> bool:
    from vitasks.engine import amp

    return "torch.amp.GradScaler(self.device_type" in inspect.getsource(amp)


def _configs_use_fused_adamw() -> bool:
    for path in (REPO / "configs").rglob("*.yaml"):
        text = yaml.safe_load(path.read_text()) or {}
        optimizer = (text.get("optim_wrapper") or {}).get("optimizer") or {}
        if optimizer.get("type") == "AdamW" and optimizer.get("fused"):
            return True  # the training device may be the CPU
    return False


#: feature -> (first torch release with it, the source of that fact, is it used)
FEATURES = {
    "(object, 'module.name') entries in torch.serialization.safe_globals": (
        "2.6", "pytorch/pytorch#142153 (Dec 2024, in 2.6)", _allowlist_has_named_entries),
    "torch.serialization.safe_globals context manager": (
        "2.5", "torch 2.5 release notes (add_safe_globals 2.4, the context manager 2.5)",
        _checkpoint_loading_uses_safe_globals),
    "torch.optim.AdamW(fused=True) on the CPU": (
        "2.4", "torch 2.4 release notes (fused Adam/AdamW/SGD on CPU)", _configs_use_fused_adamw),
    "torch.amp.GradScaler(device)": (
        "2.3", "torch 2.3 (device-generic GradScaler; torch.cuda.amp.GradScaler deprecated in 2.4, "
        "pytorch/pytorch#126527)", _amp_uses_device_grad_scaler),
}


def declared_torch() -> Requirement:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = [line.strip() for line in parser["options"]["install_requires"].splitlines()]
    (torch_line,) = [line for line in lines if line and Requirement(line).name == "torch"]
    return Requirement(torch_line)


def lower_bound(requirement: Requirement) -> Version:
    bounds = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    assert len(bounds) == 1, f"setup.cfg: torch needs one '>=' bound, got {requirement}"
    return bounds[0]


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_each_feature_in_the_table_is_used(feature):
    _, _, used = FEATURES[feature]
    assert used(), f"{feature} is no longer used: drop it from FEATURES and recheck setup.cfg's torch minimum"


def test_declared_minimum_is_the_newest_feature_release():
    needed = max(Version(release) for release, _, _ in FEATURES.values())
    assert lower_bound(declared_torch()) == needed


def upper_bound(requirement: Requirement) -> Version:
    bounds = [Version(spec.version) for spec in requirement.specifier if spec.operator == "<"]
    assert len(bounds) == 1, f"setup.cfg: torch needs one '<' bound, got {requirement}"
    return bounds[0]


def test_tested_torch_satisfies_the_declared_range():
    requirement = declared_torch()
    for tested in TESTED_TORCH:
        assert requirement.specifier.contains(tested), f"CI tests torch {tested}, outside {requirement}"
    import torch

    installed = Version(torch.__version__.split("+")[0])
    assert requirement.specifier.contains(installed), f"torch {installed} is outside setup.cfg's {requirement}"


def test_upper_bound_is_the_release_after_the_newest_tested():
    # Every minor release up to the newest tested one is admitted; the next one, not yet tested,
    # is not (a cap below a release CI tests would downgrade users, as <2.14 did).
    newest = max(Version(v) for v in TESTED_TORCH)
    assert upper_bound(declared_torch()) == Version(f"{newest.major}.{newest.minor + 1}")


def test_setup_env_pins_the_tested_torches():
    # Each leg's torch is what tools/setup_env.sh installs, so the list above is CI's truth.
    text = SETUP_ENV.read_text()
    for tested in TESTED_TORCH:
        assert f"torch=={tested}" in text, f"tools/setup_env.sh does not install torch=={tested}"
