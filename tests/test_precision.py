"""Precision names: "auto" resolved from what the device does natively, the probe behind it on a
CPU, and dino-train's one-line messages (the resolution, or a warning for a slow explicit choice)."""
import argparse
import os
import platform
import subprocess
import sys

import pytest
import torch

import dino_pytorch.precision as precision
from dino_pytorch.cli.train_flags import settle_precision
from dino_pytorch.precision import (
    PRECISION_REQUESTS,
    PRECISIONS,
    autocast,
    cpu_slowdown,
    grad_scaler,
    native_precision,
    resolve_precision,
    support_note,
)
from train_cases import ROOT, TINY_VIT_SGD, load, run

CPU = torch.device("cpu")


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set the CPU probe's answer: cpu_bf16(0.3) is an AMX machine, cpu_bf16(inf) an AVX2 one."""
    def set_slowdown(bf16, fp16=float("inf")):
        monkeypatch.setattr(precision, "cpu_slowdown", lambda name: {"fp32": 1.0, "bf16": bf16, "fp16": fp16}[name])
    return set_slowdown


def test_names():
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    assert PRECISION_REQUESTS == ("auto", "fp32", "bf16", "fp16")


@pytest.mark.parametrize("slowdown, native", [(0.3, True), (1.0, True), (1.8, False), (5.1, False),
                                              (float("inf"), False)])
def test_resolve_auto_on_cpu_follows_native_check(cpu_bf16, slowdown, native):
    cpu_bf16(slowdown)
    assert native_precision("bf16", "cpu") is native
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("auto", CPU) == resolve_precision("auto", "cpu")
    for name in PRECISIONS:  # an explicit precision is kept, native or not
        assert resolve_precision(name, "cpu") == name
    assert native_precision("fp32", "cpu")


@pytest.mark.parametrize("ampere", [True, False])
def test_resolve_auto_on_cuda_follows_torch(monkeypatch, ampere):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or ampere)
    assert resolve_precision("auto", "cuda:1") == ("bf16" if ampere else "fp32")
    assert asked == [False]  # emulated bf16 (before Ampere) is not native
    assert native_precision("fp16", "cuda") and native_precision("bf16", torch.device("cuda")) is ampere
    assert not native_precision("bf16", "meta") and resolve_precision("auto", "meta") == "fp32"  # unknown: fp32


def test_unknown_names_are_refused_naming_the_argument():
    for call in (resolve_precision, native_precision, support_note):
        with pytest.raises(ValueError, match="precision='fp8'"):
            call("fp8", "cpu")
    with pytest.raises(ValueError, match="precision='fp8'"):
        cpu_slowdown("fp8")
    # "auto" is a request, not something autocast can run: resolve it first.
    for call in (autocast, grad_scaler):
        with pytest.raises(ValueError, match="precision='auto'.*resolve_precision"):
            call("auto", "cpu")


def test_resolved_names_run(cpu_bf16):
    cpu_bf16(0.3)
    x = torch.randn(4, 4)
    with autocast(resolve_precision("auto", "cpu"), "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    assert grad_scaler(resolve_precision("auto", "cpu"), "cpu") is None


def test_cpu_probe_is_real_cached_and_agrees_with_onednn():
    assert cpu_slowdown("fp32") == 1.0
    query = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported, "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}
    for name in ("bf16", "fp16"):
        slowdown = cpu_slowdown(name)
        assert slowdown > 0
        assert (slowdown == float("inf")) == (not (torch.backends.mkldnn.is_available() and query[name]()))
        assert cpu_slowdown(name) == slowdown  # once per process: the same answer, not a second probe
    assert native_precision("bf16", "cpu") == (cpu_slowdown("bf16") <= precision.NATIVE_MAX_SLOWDOWN)


def test_probe_follows_what_onednn_runs_not_the_cpu_flags():
    # A process started with oneDNN's instruction set capped at AVX2 (how the developers' AVX2 machines
    # are emulated): its probe must take oneDNN's answer in that process, whatever the CPU's flags say.
    # Both variables are x86 names, which oneDNN elsewhere ignores: there the capped process must
    # agree with oneDNN all the same, and bf16 is then native only if this CPU has it.
    code = ("import torch; from dino_pytorch.precision import cpu_slowdown, resolve_precision; "
            "q = torch.ops.mkldnn; print(torch.backends.mkldnn.is_available() and q._is_mkldnn_bf16_supported(), "
            "torch.backends.mkldnn.is_available() and q._is_mkldnn_fp16_supported(), "
            "cpu_slowdown('bf16'), cpu_slowdown('fp16'), resolve_precision('auto', 'cpu'))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    bf16_supported, fp16_supported = out[0] == "True", out[1] == "True"
    bf16, fp16, auto = float(out[2]), float(out[3]), out[4]
    assert (bf16 == float("inf")) == (not bf16_supported) and (fp16 == float("inf")) == (not fp16_supported)
    assert auto == ("bf16" if bf16 <= precision.NATIVE_MAX_SLOWDOWN else "fp32")
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert out == ["False", "False", "inf", "inf", "fp32"]  # AVX2 has neither bf16 nor fp16 units


def flags(requested, use_fp16=True):
    return argparse.Namespace(precision=requested, use_fp16=use_fp16)


def test_warning_once_for_a_slow_explicit_choice(cpu_bf16, capsys):
    cpu_bf16(float("inf"))
    args = flags("bf16")
    settle_precision(args, CPU, "dino-train")
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith("dino-train: warning: --precision bf16: no native bf16 on this CPU")
    assert "several times slower than fp32" in err and "--precision auto picks fp32 here" in err
    assert args.precision == args.precision_requested == "bf16"  # warned, not overridden
    settle_precision(flags("bf16"), CPU, "dino-train", announce=False)  # ranks other than 0: silent
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("requested", [None, "fp32", "bf16"])
def test_no_warning_otherwise(cpu_bf16, capsys, requested):
    cpu_bf16(0.3)
    args = flags(requested)
    settle_precision(args, CPU, "dino-train")
    assert capsys.readouterr() == ("", "")
    assert args.precision == (requested or "fp32") and args.precision_requested == requested


def test_fp16_warning_on_a_cpu_without_it(cpu_bf16, capsys):
    cpu_bf16(0.3, fp16=float("inf"))
    settle_precision(flags("fp16"), CPU, "dino-train")
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--precision fp16: no native fp16 on this CPU" in err
    assert "auto picks bf16 here" in err


@pytest.mark.parametrize("slowdown, chosen", [(0.3, "bf16"), (float("inf"), "fp32")])
def test_auto_is_said_in_one_line(cpu_bf16, capsys, slowdown, chosen):
    cpu_bf16(slowdown)
    args = flags("auto")
    settle_precision(args, CPU, "dino-train")
    out, err = capsys.readouterr()
    assert err == "" and len(out.splitlines()) == 1
    said = "native" if chosen == "bf16" else "no native"
    assert out.startswith(f"precision auto -> {chosen} ({said} bf16 on this CPU")
    assert args.precision == chosen and args.precision_requested == "auto"


def test_bad_precision_flag_is_one_line():
    result = run(["--precision", "fp8", "--output_dir", "unused"], check=False)
    assert result.returncode == 2
    assert "--precision" in result.stderr and "'fp8'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_precision_auto_trains(tmp_path):
    out = tmp_path / "auto"
    result = run([*TINY_VIT_SGD, "--vit_depth", "2", "--vit_embed_dim", "48", "--batch_size_per_gpu", "8",
                  "--max_steps", "1", "--lr", "0.1", "--precision", "auto", "--output_dir", str(out)])
    lines = [line for line in result.stdout.splitlines() if line.startswith("precision auto -> ")]
    assert len(lines) == 1, result.stdout
    chosen = lines[0].split()[3]
    assert chosen == resolve_precision("auto", "cpu")  # the same probe in this process
    assert "--precision" not in result.stderr  # auto never warns
    args = load(out / "checkpoint.pth")["args"]
    assert args["precision"] == chosen and args["precision_requested"] == "auto"  # a resume resolves afresh
