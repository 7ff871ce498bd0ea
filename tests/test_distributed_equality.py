"""A 2-process run with batch B per rank trains the same student as a 1-process run with batch 2B,
with either augmenter: the views are keyed by each sample's global index, never by the rank.

The model has no BatchNorm (a ViT) and no drop path, so nothing else in a step depends on the rank
layout; the updates then differ only by the order of float sums (the 2-rank all-reduce against the
one batch's mean), ~1e-7 per step. SGD (its step is proportional to the averaged gradient), a real
learning rate, no clipping and no weight decay make the weights move by far more than the tolerance,
which the test checks against the initial weights.
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
TOLERANCE = 1e-5  # max abs difference of any student weight
MIN_MOVEMENT = 100 * TOLERANCE  # the largest change of a student weight over the run must exceed this
RUN_SECONDS = 60  # each run's budget on a 2-core machine
COMMON = [
    "--dataset", "fashion_mnist", "--arch", "vit_tiny", "--patch_size", "7", "--drop_path_rate", "0",
    "--out_dim", "64", "--hidden_dim", "128", "--bottleneck_dim", "128", "--local_crops_number", "2",
    "--optimizer", "sgd", "--lr", "0.5", "--clip_grad", "0", "--weight_decay", "0", "--weight_decay_end", "0",
    "--momentum_teacher", "0.9", "--warmup_epochs", "0", "--freeze_last_layer", "0", "--num_workers", "0",
    "--no_final_knn", "--no_progress", "--attention_maps", "0", "--saveckp_freq", "0", "--seed", "3",
]
B = 4  # per rank; the single process gets 2B


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(out: Path, *flags: str, processes: int = 1) -> dict:
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
    cmd = [sys.executable, *(launcher if processes > 1 else []), "-m", "dino_pytorch.train", *COMMON, *flags,
           "--log_every", str(STEPS), "--output_dir", str(out)]
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=4 * RUN_SECONDS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seconds = time.time() - start
    assert seconds < 2 * RUN_SECONDS, f"{processes}-process run took {seconds:.0f}s"
    return torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)


def floating(state: dict) -> dict:
    return {name: value for name, value in state.items() if value.is_floating_point()}


@pytest.fixture(scope="module")
def initial(tmp_path_factory) -> dict:
    # The program's initial student: one step at lr 1e-30 (no weight decay) leaves it as built, to float32
    # precision (the program takes no lr of 0).
    ckpt = train(tmp_path_factory.mktemp("init"), "--max_steps", "1", "--lr", "1e-30",
                 "--batch_size_per_gpu", str(2 * B), "--augment", "per_image")
    return floating(ckpt["student"])


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["per_image", "batched"])
def test_two_processes_train_the_student_of_one_process_with_the_doubled_batch(tmp_path, initial, augment):
    flags = ("--max_steps", str(STEPS), "--augment", augment)
    one = train(tmp_path / "one", *flags, "--batch_size_per_gpu", str(2 * B))
    two = train(tmp_path / "two", *flags, "--batch_size_per_gpu", str(B), processes=2)
    assert one["step"] == two["step"] == STEPS
    a, b = floating(one["student"]), floating(two["student"])
    assert a.keys() == b.keys() == initial.keys()
    movement = max((a[n] - initial[n]).abs().max().item() for n in a)
    assert movement > MIN_MOVEMENT, f"the student barely moved ({movement:.2e}): the comparison would be empty"
    worst = max(a, key=lambda n: (a[n] - b[n]).abs().max().item())
    difference = (a[worst] - b[worst]).abs().max().item()
    assert difference <= TOLERANCE, f"{augment}: student.{worst} differs by {difference:.2e} (moved {movement:.2e})"
    torch.testing.assert_close(one["dino_loss"]["center"], two["dino_loss"]["center"], rtol=0, atol=TOLERANCE)
