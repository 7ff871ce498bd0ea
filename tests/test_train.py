"""The reference training script end to end: resume, crash safety, NaN stop, DDP equivalence."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--dataset", "fashion_mnist", "--arch", "convnet", "--width", "8", "--out_dim", "256",
    "--hidden_dim", "64", "--bottleneck_dim", "32", "--batch_size_per_gpu", "16", "--local_crops_number", "2",
    "--num_workers", "0", "--no_final_knn", "--no_progress", "--log_every", "2", "--warmup_epochs", "0",
    "--freeze_last_layer", "0",
]


def run(args, env=None, module=("-m", "dino_pytorch.train"), launcher=None, check=True):
    cmd = [sys.executable, *(launcher or []), *module, *args]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b, atol=0.0):
    for key in ("student", "teacher", "dino_loss"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            if atol == 0.0:
                assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
            else:
                assert torch.allclose(a[key][name], b[key][name], atol=atol, rtol=0), f"{key}.{name} differs"


@pytest.mark.slow
def test_resume_after_kill_is_bitwise_identical(tmp_path):
    torch.use_deterministic_algorithms(True)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(SMALL + ["--max_steps", "8", "--output_dir", str(straight)])
    killed = run(SMALL + ["--max_steps", "8", "--output_dir", str(resumed), "--save_every_steps", "4"],
                 env={"CRASH_AFTER_STEP": "4"}, module=(str(ROOT / "tests" / "crash_after_save.py"),), check=False)
    assert killed.returncode == 17  # died right after the step-4 checkpoint
    assert load(resumed / "checkpoint.pth")["step"] == 4
    out = run(SMALL + ["--max_steps", "8", "--output_dir", str(resumed), "--save_every_steps", "4"])
    assert "resumed from" in out.stdout and "at step 4" in out.stdout
    a, b = load(straight / "checkpoint.pth"), load(resumed / "checkpoint.pth")
    assert a["step"] == b["step"] == 8
    assert_same_state(a, b)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    # SGD at lr 1e30 overflows the weights within a few steps.
    result = run(SMALL + ["--max_steps", "30", "--output_dir", str(out), "--optimizer", "sgd", "--lr", "1e30",
                          "--save_every_steps", "1", "--log_every", "1", "--clip_grad", "0"], check=False)
    assert result.returncode == 1
    assert "non-finite" in result.stderr and "step" in result.stderr and "last good checkpoint" in result.stderr
    ckpt = load(out / "checkpoint.pth")
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values() if v.is_floating_point())
    assert ckpt["step"] < 30


@pytest.mark.slow
def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    out = tmp_path / "corrupt"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    result = run(SMALL + ["--max_steps", "2", "--output_dir", str(out)], check=False)
    assert result.returncode == 2
    assert "cannot resume" in result.stderr and "checkpoint.pth" in result.stderr
    assert "Traceback" not in result.stderr


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_on_the_doubled_batch(tmp_path):
    # SGD (its step is proportional to the gradient, so summing instead of averaging over ranks would
    # double it; AdamW would hide that), a real lr, and a fast teacher, so every state moves well
    # beyond the tolerance. Updates (final - initial) are compared relatively.
    common = ["--dataset", "fashion_mnist", "--arch", "vit_tiny", "--patch_size", "7", "--out_dim", "128",
              "--hidden_dim", "32", "--bottleneck_dim", "16", "--local_crops_number", "2", "--num_workers", "0",
              "--no_final_knn", "--no_progress", "--warmup_epochs", "0", "--drop_path_rate", "0",
              "--augment", "per_image", "--max_steps", "3", "--log_every", "1", "--attention_maps", "0",
              "--freeze_last_layer", "0", "--optimizer", "sgd", "--lr", "2.0", "--momentum_teacher", "0.5",
              "--clip_grad", "0", "--weight_decay", "0", "--weight_decay_end", "0", "--saveckp_freq", "0"]
    single, ddp, init = tmp_path / "single", tmp_path / "ddp", tmp_path / "init"
    run(common + ["--batch_size_per_gpu", "8", "--output_dir", str(single)])
    run(common + ["--batch_size_per_gpu", "4", "--output_dir", str(ddp)],
        launcher=["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"])
    a, b = load(single / "checkpoint.pth"), load(ddp / "checkpoint.pth")
    assert a["step"] == b["step"] == 3
    # The initial weights: the same seed, built by the program with the schedules of zero steps run.
    run([*common, "--max_steps", "1", "--lr", "0", "--momentum_teacher", "1.0", "--batch_size_per_gpu", "8",
         "--output_dir", str(init)])
    start = load(init / "checkpoint.pth")
    for key in ("student", "teacher"):
        moved_a = torch.cat([(a[key][n] - start[key][n]).flatten() for n in a[key] if a[key][n].is_floating_point()])
        moved_b = torch.cat([(b[key][n] - start[key][n]).flatten() for n in b[key] if b[key][n].is_floating_point()])
        assert moved_a.norm() > 1e-3, f"{key} barely moved: the comparison would be empty"
        assert (moved_a - moved_b).norm() <= 1e-4 * moved_a.norm(), \
            f"{key}: relative difference of the updates {((moved_a - moved_b).norm() / moved_a.norm()).item():.2e}"
    torch.testing.assert_close(a["dino_loss"]["center"], b["dino_loss"]["center"], rtol=1e-5, atol=1e-7)
    assert not torch.equal(a["dino_loss"]["center"], torch.zeros_like(a["dino_loss"]["center"]))


@pytest.mark.slow
def test_channels_last_and_bf16_on_cpu_train_close_to_fp32(tmp_path):
    # The 60-minute Fashion-MNIST command uses both; they must change speed, not what is learned.
    base, fast = tmp_path / "fp32", tmp_path / "cl_bf16"
    run(SMALL + ["--max_steps", "3", "--output_dir", str(base)])
    run(SMALL + ["--max_steps", "3", "--output_dir", str(fast), "--channels_last", "--precision", "bf16"])
    a, b = load(base / "checkpoint.pth"), load(fast / "checkpoint.pth")
    conv = [name for name, v in b["student"].items() if v.ndim == 4 and v.shape[1] > 1]
    assert conv and all(b["student"][n].is_contiguous(memory_format=torch.channels_last) for n in conv)
    assert all(not b["student"][n].is_contiguous() for n in conv)
    assert all(b["teacher"][n].is_contiguous(memory_format=torch.channels_last) for n in conv)
    # bf16 rounds activations to 8 bits of mantissa: after 3 steps the weights agree to ~1e-3.
    for name in a["student"]:
        if a["student"][name].is_floating_point():
            assert torch.allclose(a["student"][name], b["student"][name], atol=5e-3, rtol=0), name
    assert not torch.equal(a["student"][conv[0]], b["student"][conv[0]])  # bf16 really ran
