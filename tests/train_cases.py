"""What the training-program tests share: running dino-train in a subprocess, reading its
checkpoints, and flags: a tiny ViT trained with plain SGD, so a step is
proportional to its gradient (a wrong scale or a summed-instead-of-averaged gradient shows)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# No drop path, per-image augmentation (seeded per sample), no clipping or weight decay: two runs
# that should agree differ only by what the test varies. Add --max_steps, --lr, --momentum_teacher.
TINY_VIT_SGD = [
    "--dataset", "fashion_mnist", "--arch", "vit_tiny", "--patch_size", "7", "--out_dim", "128",
    "--hidden_dim", "32", "--bottleneck_dim", "16", "--local_crops_number", "2", "--num_workers", "0",
    "--no_final_knn", "--no_progress", "--warmup_epochs", "0", "--drop_path_rate", "0",
    "--augment", "per_image", "--log_every", "1", "--attention_maps", "0", "--freeze_last_layer", "0",
    "--optimizer", "sgd", "--clip_grad", "0", "--weight_decay", "0", "--weight_decay_end", "0",
    "--saveckp_freq", "0",
]


def run(args, env=None, module=("-m", "dino_pytorch.train"), launcher=None, check=True):
    """dino-train with ``args`` in a subprocess (one thread); asserts exit 0 unless ``check=False``."""
    cmd = [sys.executable, *(launcher or []), *module, *args]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def in_process_usage_error(argv, capsys):
    """dino-train run in this process with ``argv``: asserts it exits 2 with one ``dino-train: error:``
    line on stderr, and returns that line."""
    import pytest

    from dino_pytorch.cli import train

    with pytest.raises(SystemExit) as info:
        train.main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("dino-train: error: "), err
    return err
