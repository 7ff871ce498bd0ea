"""dino-train --distill_from: a ConvNet student distilled from a dino-train ConvNet teacher's checkpoint
(its prototype count taken, the teacher untouched, the EMA student saved), and the one-line errors."""
from __future__ import annotations

import pytest
import torch

from dino_pytorch.cli import train
from train_cases import in_process_usage_error as one_line_error
from train_cases import load

BASE = ["--dataset", "fashion_mnist", "--arch", "convnet", "--hidden_dim", "16", "--bottleneck_dim", "8",
        "--batch_size_per_gpu", "8", "--local_crops_number", "1", "--max_steps", "2", "--num_workers", "0",
        "--no_final_knn", "--no_progress", "--attention_maps", "0", "--device", "cpu", "--log_every", "1",
        "--knn_every", "0"]




@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert train.main([*BASE, "--width", "8", "--out_dim", "32", "--output_dir", str(out)]) == 0
    return out / "checkpoint.pth"


def test_a_smaller_student_distils_from_a_checkpoint(tmp_path, teacher_run, capsys):
    out = tmp_path / "student"
    assert train.main([*BASE, "--width", "4", "--distill_from", str(teacher_run), "--output_dir", str(out)]) == 0
    assert f"Distilling from the frozen teacher of {teacher_run} (32 prototypes)" in capsys.readouterr().out
    saved, teacher = load(out / "checkpoint.pth"), load(teacher_run)
    assert saved["step"] == 2 and saved["model_config"]["head"]["out_dim"] == 32
    assert saved["teacher"]["backbone.features.0.0.weight"].shape[0] == 4  # the saved network is the EMA student
    assert saved["teacher"]["head.last_layer.weight_v"].shape[0] == 32
    assert teacher["teacher"]["backbone.features.0.0.weight"].shape[0] == 8
    assert all(torch.equal(v, load(teacher_run)["teacher"][k]) for k, v in teacher["teacher"].items())


def test_flag_errors_are_one_line(tmp_path, teacher_run, capsys):
    base = [*BASE, "--width", "4", "--output_dir", str(tmp_path / "run")]
    err = one_line_error([*base, "--distill_from", str(tmp_path / "none.pth")], capsys)
    assert f"--distill_from '{tmp_path / 'none.pth'}': no such file" in err
    err = one_line_error([*base, "--distill_from", str(teacher_run), "--out_dim", "16"], capsys)
    assert f"--out_dim 16 with --distill_from {teacher_run}: the student's head must match the teacher's 32" in err
    err = one_line_error([*base, "--distill_from", str(teacher_run), "--fsdp"], capsys)
    assert f"--distill_from {teacher_run} with --fsdp" in err
    weights = tmp_path / "backbone.pth"
    torch.save({"stem.0.weight": torch.zeros(1)}, weights)
    err = one_line_error([*base, "--distill_from", str(weights)], capsys)
    assert f"--distill_from {weights}: " in err and "expected a dino-train checkpoint" in err
