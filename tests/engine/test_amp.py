"""Mixed precision (``--amp``, ``optim_wrapper.dtype``) on CPU (vitasks/engine/amp.py), and the
warning for bf16 on CPUs that emulate it (vitasks/benchmarks/machine.py)."""

import math

import pytest
import torch

import vitasks_toy_plugin as toy
from vitasks.engine import amp, launch
from vitasks.benchmarks import machine as cpu_info_module
from vitasks.engine.amp import MixedPrecisionOptimWrapper
from vitasks.benchmarks.machine import cpu_info, from_torch_cpuinfo, parse_cpuinfo
from vitasks.engine.launch import train
from vitasks.errors import ConfigError

SHORT = dict(train_cfg=dict(max_epochs=1))


@pytest.fixture(autouse=True)
def _clear_seen_dtypes():
    toy.SEEN_DTYPES.clear()
    yield


def test_amp_trains_in_bfloat16_and_validates_under_autocast(tmp_path):
    losses = tmp_path / "losses.jsonl"
    runner = train(toy.write_config(tmp_path, losses=losses, **SHORT), work_dir=str(tmp_path / "wd"), amp=True)
    assert isinstance(runner.optim_wrapper, MixedPrecisionOptimWrapper)
    assert not runner.optim_wrapper.loss_scaler.is_enabled()  # bf16 needs no loss scaling
    assert toy.SEEN_DTYPES == {"loss": torch.bfloat16, "predict": torch.bfloat16}
    values = toy.read_losses(losses)
    assert len(values) == 4 and all(math.isfinite(v) for v in values.values())
    # The parameters stay float32 (autocast only changes the compute dtype) and were updated.
    assert runner.model.head.fc.weight.dtype == torch.float32
    assert torch.count_nonzero(runner.model.head.fc.weight) > 0


def test_without_amp_everything_is_float32(tmp_path):
    train(toy.write_config(tmp_path, **SHORT), work_dir=str(tmp_path / "wd"))
    assert toy.SEEN_DTYPES == {"loss": torch.float32, "predict": torch.float32}


def test_float16_with_loss_scaling_from_the_config(tmp_path):
    cfg = toy.write_config(tmp_path, optim_wrapper=dict(dtype="float16"), **SHORT)
    runner = train(cfg, work_dir=str(tmp_path / "wd"))
    assert toy.SEEN_DTYPES["loss"] == torch.float16
    scaler = runner.optim_wrapper.loss_scaler
    assert scaler.is_enabled() and scaler.get_scale() > 1.0
    # The scaler state is part of the checkpoint, so a resumed fp16 run keeps its scale.
    assert "loss_scaler" in runner.optim_wrapper.state_dict()


def test_test_runs_under_autocast_with_amp(tmp_path):
    model = toy.ToyClassifier()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.pth")
    launch.test(toy.write_config(tmp_path), str(tmp_path / "m.pth"), work_dir=str(tmp_path / "wd"), amp=True)
    assert toy.SEEN_DTYPES == {"predict": torch.bfloat16}


def test_bad_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="float64"):
        MixedPrecisionOptimWrapper(dtype="float64", optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


# ------------------------------------------------------------------------------------------
# bf16 on CPUs without bf16 instructions (vitasks/benchmarks/machine.py, amp.slow_bf16_reason)

# First-processor blocks of /proc/cpuinfo, trimmed to the lines the detection reads (the flags
# lines are the real ones of these CPUs, shortened but keeping every AVX-512 / AMX flag).
HASWELL = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz
flags\t\t: fpu vme de pse tsc msr pae mce sse sse2 ssse3 fma cx16 sse4_1 sse4_2 popcnt aes avx f16c rdrand avx2 bmi1 bmi2 erms
"""
SKYLAKE_AVX512 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512cd avx512bw avx512vl
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512dq avx512_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx avx2
"""
ZEN4 = """processor\t: 0
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512dq avx512_bf16 avx512vl avx512_vnni
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
"""
GRAVITON2 = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize(
    "text,arch,bf16,flags",
    [
        (HASWELL, "x86_64", False, ("avx2",)),
        (SKYLAKE_AVX512, "x86_64", False, ("avx2", "avx512f")),  # AVX-512 without BF16: emulated
        (SAPPHIRE_RAPIDS, "x86_64", True, ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")),
        (ZEN4, "x86_64", True, ("avx2", "avx512f", "avx512_bf16")),
        (GRAVITON3, "aarch64", True, ("asimd", "sve", "bf16")),
        (GRAVITON2, "aarch64", False, ("asimd",)),
        (HASWELL, "ppc64le", None, ()),  # an architecture the detection does not know
        ("processor\t: 0\nmodel name\t: Some CPU\n", "x86_64", None, ()),  # no flags line
        ("", "x86_64", None, ()),
    ],
)
def test_bf16_detection_from_proc_cpuinfo(text, arch, bf16, flags):
    info = parse_cpuinfo(text, arch, isa="AVX2")
    assert info.bf16 is bf16
    assert info.flags == flags
    if "model name" in text:  # the first processor's name
        assert info.model_name == text.split("model name\t: ", 1)[1].split("\n", 1)[0]


def test_bf16_detection_from_torch_cpuinfo_description():
    base = {"cpu_name": "X", "avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}
    assert from_torch_cpuinfo(base, "x86_64").bf16 is False
    assert from_torch_cpuinfo(base, "x86_64").flags == ("avx2", "avx512f")
    assert from_torch_cpuinfo(dict(base, amx_bf16=True), "x86_64").bf16 is True
    assert from_torch_cpuinfo({"cpu_name": "X"}, "x86_64").bf16 is None  # keys missing: unknown
    assert from_torch_cpuinfo(dict(base, avx512_bf16=True), "arm64").bf16 is None


def test_this_machine_agrees_with_torch():
    # The detection on the real machine agrees with PyTorch's own (cpuinfo library) flags.
    info = cpu_info()
    described = getattr(torch._C._cpu, "_get_cpu_capability", None)
    if info.arch not in ("x86_64", "amd64") or described is None:
        pytest.skip("x86 only")
    flags = described()
    assert info.bf16 == (bool(flags.get("avx512_bf16")) or bool(flags.get("amx_bf16")))
    assert info.isa == torch.backends.cpu.get_cpu_capability()


NO_BF16 = parse_cpuinfo(HASWELL, "x86_64", isa="AVX2")
WITH_BF16 = parse_cpuinfo(SAPPHIRE_RAPIDS, "x86_64", isa="AVX512")
UNKNOWN = parse_cpuinfo("", "x86_64")


def test_slow_bf16_reason_only_for_bf16_on_a_cpu_without_it():
    reason = amp.slow_bf16_reason("cpu", "bfloat16", NO_BF16)
    assert "E5-2686" in reason and "ISA AVX2" in reason and "flags: avx2" in reason
    assert "AVX-512 BF16 / AMX" in reason and "slower than float32" in reason and "drop --amp" in reason
    assert amp.slow_bf16_reason("cpu", torch.bfloat16, NO_BF16) == reason
    assert amp.slow_bf16_reason("cuda", "bfloat16", NO_BF16) is None
    assert amp.slow_bf16_reason("cpu", "float16", NO_BF16) is None
    assert amp.slow_bf16_reason("cpu", "bfloat16", WITH_BF16) is None
    assert amp.slow_bf16_reason("cpu", "bfloat16", UNKNOWN) is None


@pytest.fixture
def fresh_warning(monkeypatch):
    """No slow-bf16 warning given yet in this process; the detection returns what `use` sets."""
    monkeypatch.setattr(amp, "_warned_slow_bf16", False)
    detected = {"info": NO_BF16}
    monkeypatch.setattr(cpu_info_module, "cpu_info", lambda: detected["info"])
    return detected


def _amp_config(tmp_path, **overrides):
    return launch.prepare_config(toy.write_config(tmp_path, **overrides), work_dir=str(tmp_path / "wd"))


def test_amp_on_a_cpu_without_bf16_warns_once(tmp_path, fresh_warning, recwarn):
    runner = train(toy.write_config(tmp_path, **SHORT), work_dir=str(tmp_path / "wd"), amp=True)
    slow = [w for w in recwarn if issubclass(w.category, amp.SlowBf16Warning)]
    assert len(slow) == 1
    assert "E5-2686" in str(slow[0].message) and "drop --amp" in str(slow[0].message)
    assert runner.optim_wrapper.cast_dtype == torch.bfloat16  # a warning, not a refusal
    # A second --amp command in the same process (e.g. test after train) does not repeat it.
    launch._apply_amp(_amp_config(tmp_path), amp=True)
    assert len([w for w in recwarn if issubclass(w.category, amp.SlowBf16Warning)]) == 1


def test_no_bf16_warning_with_bf16_float16_gpu_or_without_amp(tmp_path, fresh_warning, recwarn, monkeypatch):
    fresh_warning["info"] = WITH_BF16
    launch._apply_amp(_amp_config(tmp_path), amp=True)
    fresh_warning["info"] = UNKNOWN
    launch._apply_amp(_amp_config(tmp_path), amp=True)
    fresh_warning["info"] = NO_BF16
    launch._apply_amp(_amp_config(tmp_path), amp=False)
    launch._apply_amp(_amp_config(tmp_path, optim_wrapper=dict(dtype="float16")), amp=True)
    monkeypatch.setattr(amp, "device_type", lambda: "cuda")
    launch._apply_amp(_amp_config(tmp_path), amp=True)
    assert not [w for w in recwarn if issubclass(w.category, amp.SlowBf16Warning)]
    # The same machine on the CPU with bf16 from the config (no --amp) does warn.
    monkeypatch.setattr(amp, "device_type", lambda: "cpu")
    launch._apply_amp(_amp_config(tmp_path, optim_wrapper=dict(dtype="bfloat16")), amp=False)
    assert len([w for w in recwarn if issubclass(w.category, amp.SlowBf16Warning)]) == 1
