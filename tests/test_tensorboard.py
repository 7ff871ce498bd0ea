"""dino-train --tensorboard: metrics.jsonl's scalars and the final pictures as TensorBoard events,
and a run that ends well without tensorboard installed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The tiny run of tests/test_cli_programs.py: 3 steps of a 2-block ViT on Fashion-MNIST.
TINY = ["--dataset", "fashion_mnist", "--out_dim", "128", "--hidden_dim", "32", "--bottleneck_dim", "16",
        "--batch_size_per_gpu", "8", "--local_crops_number", "2", "--num_workers", "0", "--no_progress",
        "--max_steps", "3", "--log_every", "1", "--warmup_epochs", "0", "--freeze_last_layer", "0"]
VIT = ["--arch", "vit_tiny", "--patch_size", "7", "--vit_depth", "2", "--vit_embed_dim", "48"]


def train(out: Path, *args: str, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dino_pytorch.cli.train", *TINY, *VIT, "--no_final_knn",
                             "--output_dir", str(out), *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


@pytest.mark.slow
def test_tensorboard_holds_the_metrics_and_the_pictures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(out, "--tensorboard", "--attention_maps", "1")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
    assert sorted(losses) == [1, 2, 3]

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    # Every numeric value of the step records is a curve (lr, momentum, collapse metrics, ...).
    assert {k for k, v in records[0].items() if k != "step" and isinstance(v, float)} <= set(scalars)
    logged = events.Scalars("train_loss")
    assert [e.step for e in logged] == [1, 2, 3]
    # TensorBoard stores float32: equal to metrics.jsonl's float64 to float32 precision.
    assert [e.value for e in logged] == pytest.approx([losses[s] for s in (1, 2, 3)], rel=1e-6)

    images = set(events.Tags()["images"])
    assert "curves" in images
    assert any(tag.startswith("attention/000/") for tag in images), images
    assert all(e.step == 3 for tag in images for e in events.Images(tag))


@pytest.mark.slow
def test_without_tensorboard_the_run_says_so_in_one_line_and_ends_well(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "tensorboard.py").write_text("raise ImportError('blocked by the test: tensorboard')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "run"
    result = train(out, "--tensorboard", "--attention_maps", "0", env=env)
    skipped = [line for line in result.stdout.splitlines() if "TensorBoard" in line]
    assert len(skipped) == 1 and "skipped" in skipped[0] and "tensorboard" in skipped[0], result.stdout
    assert (out / "metrics.jsonl").exists() and not (out / "tensorboard").exists()
