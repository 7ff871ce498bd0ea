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


def test_a_resume_keeps_its_teacher(tmp_path, teacher_run, capsys):
    """The teacher is rebuilt from --distill_from on a resume: the same weights (the file may move) are
    taken, other weights or none are refused, and a plain run does not turn into a distilled one."""
    out = tmp_path / "run"
    student = [*BASE, "--width", "4", "--out_dim", "32", "--output_dir", str(out)]
    assert train.main([*student, "--distill_from", str(teacher_run)]) == 0
    assert isinstance(load(out / "checkpoint.pth")["distill_teacher_fingerprint"], str)
    moved, other = tmp_path / "moved.pth", tmp_path / "other.pth"
    moved.write_bytes(teacher_run.read_bytes())
    capsys.readouterr()
    assert train.main([*student, "--distill_from", str(moved), "--max_steps", "3",
                       "--allow_schedule_change"]) == 0
    assert load(out / "checkpoint.pth")["step"] == 3
    changed = load(teacher_run)
    changed["teacher"]["head.last_layer.weight_g"] = changed["teacher"]["head.last_layer.weight_g"] * 2
    torch.save(changed, other)
    capsys.readouterr()  # the resumed run's own warnings
    err = one_line_error([*student, "--distill_from", str(other)], capsys)
    assert f"it was distilled from another teacher (--distill_from {moved}, whose weights differ" in err
    err = one_line_error(student, capsys)
    assert f"it was trained with distillation (--distill_from {moved}), and this run has no --distill_from" in err
    plain = [*BASE, "--width", "4", "--out_dim", "32", "--output_dir", str(tmp_path / "plain")]
    assert train.main(plain) == 0
    capsys.readouterr()
    err = one_line_error([*plain, "--distill_from", str(teacher_run)], capsys)
    assert f"it was trained without distillation, and this run has --distill_from {teacher_run}" in err
