"""Training-program features run end to end through ``python -m dino_pytorch.cli.train``.

Tiny runs (a few steps of tiny models): gradient accumulation, the fp16 GradScaler on the CPU,
the first-epoch last-layer freeze, LARS, epoch-based schedules with warm-ups on an ImageFolder,
per-epoch log.txt lines and checkpoints, the periodic k-NN, the time budget, torch.compile and
the torchvision / timm architectures.

Two facts make the start weights unnecessary: the teacher starts as an exact copy of the student
and is updated by ``lerp`` (so a student tensor that never moved still equals its teacher
bitwise, and with ``--momentum_teacher 1.0`` the teacher stays the initial weights for ever).
"""
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reference import official_cosine_scheduler, official_teacher_temp_schedule
from train_cases import TINY_VIT_SGD, load, run

ROOT = Path(__file__).resolve().parents[1]
# Copied from tests/test_train.py (not imported: that file changes independently).
SMALL = [
    "--dataset", "fashion_mnist", "--arch", "convnet", "--width", "8", "--out_dim", "256",
    "--hidden_dim", "64", "--bottleneck_dim", "32", "--batch_size_per_gpu", "16", "--local_crops_number", "2",
    "--num_workers", "0", "--no_final_knn", "--no_progress", "--log_every", "2", "--warmup_epochs", "0",
    "--freeze_last_layer", "0",
]
LAST_LAYER = ("head.last_layer.weight_v", "head.last_layer.weight_g")


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def moved(ckpt, name):
    """How far the student's ``name`` is from the teacher's (0 exactly when it never moved)."""
    return (ckpt["student"][name] - ckpt["teacher"][name]).abs().max().item()


def trainable_names(ckpt):
    return [n for n, v in ckpt["student"].items() if v.is_floating_point() and "running" not in n
            and n != "head.last_layer.weight_g"]  # g is frozen by --norm_last_layer true


# ------------------------------------------------------------------------------- ImageFolder run

def write_image_folder(root, per_class):
    """root/{train,val}/{a,b}/*.png, 32 x 32 RGB. Training reads ``root`` as an ImageFolder whose
    "classes" are train and val (every image), the k-NN reads root/train and root/val."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in per_class.items():
        for c, cls in enumerate("ab"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                base = torch.full((32, 32, 3), 60.0 + 120.0 * c)
                pixels = (base + 40 * torch.randn(32, 32, 3, generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


def naive_knn_top1(train_f, train_y, test_f, test_y, k=20, T=0.07):
    """The official weighted k-NN vote, one test image at a time (float64)."""
    train_f, test_f = F.normalize(train_f.double(), dim=1), F.normalize(test_f.double(), dim=1)
    correct = 0
    for f, y in zip(test_f, test_y):
        sim = train_f @ f
        top = torch.argsort(sim, descending=True)[:k]
        votes = torch.zeros(int(train_y.max()) + 1, dtype=torch.float64)
        for i in top.tolist():
            votes[int(train_y[i])] += math.exp(sim[i].item() / T)
        correct += int(votes.argmax().item() == int(y))
    return 100.0 * correct / len(test_y)


@pytest.fixture(scope="module")
def imagefolder_run(tmp_path_factory):
    """3 epochs of 2 steps (24 images, batch 12) with LARS, warm-ups, freeze, k-NN every 2 steps."""
    tmp = tmp_path_factory.mktemp("imagefolder")
    data, out = tmp / "data", tmp / "out"
    write_image_folder(data, {"train": 10, "val": 2})  # 20 + 4 images
    args = ["--dataset", "imagefolder", "--data_path", str(data), "--arch", "convnet", "--width", "8",
            "--out_dim", "256", "--hidden_dim", "64", "--bottleneck_dim", "32", "--batch_size_per_gpu", "12",
            "--local_crops_number", "2", "--global_crop_size", "32", "--local_crop_size", "16",
            "--num_workers", "0", "--no_final_knn", "--no_progress", "--log_every", "1",
            "--epochs", "3", "--warmup_epochs", "1", "--warmup_teacher_temp", "0.04", "--teacher_temp", "0.07",
            "--warmup_teacher_temp_epochs", "3", "--saveckp_freq", "1", "--optimizer", "lars", "--lr", "20",
            "--freeze_last_layer", "1", "--knn_every", "2", "--knn_train_subset", "20", "--knn_test_subset", "3",
            "--output_dir", str(out)]
    run(args)
    return data, out


@pytest.mark.slow
def test_epoch_schedules_with_warmups_match_official(imagefolder_run):
    _, out = imagefolder_run
    steps = [r for r in records(out) if "train_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # 3 epochs x 2 steps: --epochs decides the length
    assert [r["epoch"] for r in steps] == [0, 0, 1, 1, 2, 2]
    niter, epochs = 2, 3
    lr = official_cosine_scheduler(20 * 12 / 256, 1e-6, epochs, niter, warmup_epochs=1)
    wd = official_cosine_scheduler(0.04, 0.4, epochs, niter)
    momentum = official_cosine_scheduler(0.996, 1.0, epochs, niter)
    temp = official_teacher_temp_schedule(0.04, 0.07, 3, epochs)
    assert lr[0] == 0 and lr[1] == 20 * 12 / 256  # the warm-up really is in there
    assert temp == pytest.approx([0.04, 0.055, 0.07], rel=1e-12)
    for i, r in enumerate(steps):
        assert r["lr"] == pytest.approx(lr[i], rel=1e-12, abs=1e-15), f"lr at step {i}"
        assert r["wd"] == pytest.approx(wd[i], rel=1e-12), f"wd at step {i}"
        assert r["momentum"] == pytest.approx(momentum[i], rel=1e-12), f"momentum at step {i}"
        assert r["teacher_temp"] == pytest.approx(temp[r["epoch"]], rel=1e-12), f"teacher temp at step {i}"
        assert math.isfinite(r["train_loss"])


@pytest.mark.slow
def test_epoch_log_lines_and_epoch_checkpoints(imagefolder_run):
    _, out = imagefolder_run
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2]  # one official line per epoch
    steps = [r for r in records(out) if "train_loss" in r]
    for line in lines:
        epoch_steps = [r for r in steps if r["epoch"] == line["epoch"]]
        # train_lr / train_wd: the values of the epoch's last step; train_loss: the mean of its steps.
        assert line["train_lr"] == epoch_steps[-1]["lr"] and line["train_wd"] == epoch_steps[-1]["wd"]
        assert line["train_loss"] == pytest.approx(sum(r["train_loss"] for r in epoch_steps) / 2, rel=1e-5)
    for epoch in range(3):
        ckpt = load(out / f"checkpoint{epoch:04}.pth")
        assert ckpt["epoch"] == epoch + 1 and ckpt["step"] == 2 * (epoch + 1)
    assert not (out / "checkpoint0003.pth").exists()
    final = load(out / "checkpoint.pth")
    last = load(out / "checkpoint0002.pth")
    assert all(torch.equal(final["student"][n], last["student"][n]) for n in final["student"])


@pytest.mark.slow
def test_lars_through_the_program_and_first_epoch_freeze(imagefolder_run):
    _, out = imagefolder_run
    first, second = load(out / "checkpoint0000.pth"), load(out / "checkpoint0001.pth")
    # LARS ran: its momentum buffers are in the optimizer state, and the weights moved.
    state = second["optimizer"]["state"]
    assert state and all(set(s) == {"mu"} for s in state.values())
    names = trainable_names(first)
    body = [n for n in names if n not in LAST_LAYER]
    assert all(moved(first, n) > 1e-5 for n in body), [n for n in body if moved(first, n) <= 1e-5]
    # --freeze_last_layer 1: the prototypes did not move in epoch 0 (steps 1-2), and did in epoch 1.
    assert moved(first, "head.last_layer.weight_v") == 0.0
    assert moved(second, "head.last_layer.weight_v") > 1e-5
    # Epoch 0 saw no last-layer gradient, so LARS made no buffer for it: 1 fewer state entry.
    assert len(first["optimizer"]["state"]) == len(state) - 1


@pytest.mark.slow
def test_periodic_knn_records_with_subsets(imagefolder_run):
    from dino_pytorch.cli._setup import eval_datasets
    from dino_pytorch.model_config import build_backbone

    data, out = imagefolder_run
    knn = [r for r in records(out) if "knn_top1_subset" in r]
    assert [r["step"] for r in knn] == [0, 2, 4]  # at random init, then every 2 steps (not at the end)
    assert all(r["knn_subset"] == [20, 3] for r in knn)
    assert not any("knn_top1" in r for r in records(out))  # --no_final_knn
    # The step-2 value equals a naive k-NN of the teacher saved at step 2 on the first 20 / 3 images.
    ckpt = load(out / "checkpoint0000.pth")
    model = build_backbone(ckpt["model_config"])
    model.load_state_dict({k[len("backbone."):]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")})
    model.eval()
    train_set, test_set = eval_datasets("imagefolder", str(data), 3, 32)
    with torch.no_grad():
        train = [train_set[i] for i in range(20)]
        test = [test_set[i] for i in range(3)]
        train_f = model(torch.stack([x for x, _ in train]))
        test_f = model(torch.stack([x for x, _ in test]))
    expected = naive_knn_top1(train_f, torch.tensor([y for _, y in train]), test_f, torch.tensor([y for _, y in test]))
    assert knn[1]["knn_top1_subset"] == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------------------- other features

@pytest.mark.slow
def test_grad_accum_two_by_8_equals_one_by_16(tmp_path):
    # SGD (its step is proportional to the gradient: a wrong accumulation scale shows), a real lr,
    # --momentum_teacher 1.0 (the teacher stays the initial weights: the start to measure updates
    # from), per-image augmentation (seeded per sample, so both runs see the same views).
    common = [*TINY_VIT_SGD, "--vit_depth", "2", "--vit_embed_dim", "48", "--max_steps", "2", "--lr", "20.0",
              "--momentum_teacher", "1.0"]
    accum, big = tmp_path / "accum", tmp_path / "big"
    run(common + ["--batch_size_per_gpu", "8", "--grad_accum_steps", "2", "--output_dir", str(accum)])
    run(common + ["--batch_size_per_gpu", "16", "--output_dir", str(big)])
    a, b = load(accum / "checkpoint.pth"), load(big / "checkpoint.pth")
    assert a["step"] == b["step"] == 2
    names = trainable_names(a)
    for name in names:
        assert torch.equal(a["teacher"][name], b["teacher"][name]), "not the same initial weights"
    upd_a = torch.cat([(a["student"][n] - a["teacher"][n]).flatten() for n in names])
    upd_b = torch.cat([(b["student"][n] - b["teacher"][n]).flatten() for n in names])
    assert upd_b.norm() > 1e-2 * torch.cat([b["teacher"][n].flatten() for n in names]).norm()  # real movement
    rel = ((upd_a - upd_b).norm() / upd_b.norm()).item()
    assert rel <= 1e-4, f"relative difference of the updates {rel:.2e}"
    # The centre too: once per optimizer step, over all 16 images.
    torch.testing.assert_close(a["dino_loss"]["center"], b["dino_loss"]["center"], rtol=1e-5, atol=1e-7)
    losses_a = [r["train_loss"] for r in records(accum) if "train_loss" in r]
    losses_b = [r["train_loss"] for r in records(big) if "train_loss" in r]
    assert len(losses_a) == 2
    # The logged loss is the last micro-batch's (8 of the 16 images): finite, near the full batch's.
    assert all(math.isfinite(x) for x in losses_a) and losses_a[0] == pytest.approx(losses_b[0], rel=0.2)


@pytest.mark.slow
def test_fp16_grad_scaler_on_cpu(tmp_path):
    out = tmp_path / "fp16"
    # The scaler starts at 2**16 and halves on every overflowing step (which it skips): enough steps
    # to get past that and take real ones.
    run(SMALL + ["--max_steps", "10", "--precision", "fp16", "--output_dir", str(out)])
    ckpt = load(out / "checkpoint.pth")
    scaler = ckpt["fp16_scaler"]
    assert set(scaler) >= {"scale", "growth_factor", "_growth_tracker"}
    assert scaler["scale"] < 2.0 ** 16 and scaler["_growth_tracker"] >= 1  # backed off, then stepped
    losses = [r["train_loss"] for r in records(out) if "train_loss" in r]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    names = trainable_names(ckpt)
    assert all(moved(ckpt, n) > 0 for n in names), [n for n in names if moved(ckpt, n) == 0]
    # --freeze_last_layer 0 (in SMALL): the prototypes move in epoch 0 too.
    assert moved(ckpt, "head.last_layer.weight_v") > 0


@pytest.mark.slow
def test_torchvision_resnet18_and_time_budget(tmp_path):
    out = tmp_path / "resnet"
    args = [*SMALL, "--arch", "resnet18", "--global_crop_size", "16", "--local_crop_size", "8",
            "--batch_size_per_gpu", "4", "--max_steps", "5", "--time_budget_min", "0.00001", "--output_dir", str(out)]
    result = run(args)
    assert "time budget of 1e-05 min reached" in result.stdout and "stopped at step 1/5" in result.stdout
    ckpt = load(out / "checkpoint.pth")
    assert ckpt["step"] == 1 and ckpt["model_config"]["arch"] == "resnet18"
    assert ckpt["student"]["backbone.conv1.weight"].shape == (64, 3, 7, 7)  # grey images repeated to RGB
    assert not any(n.startswith("backbone.fc.") for n in ckpt["student"])  # the classifier is bypassed
    assert moved(ckpt, "backbone.conv1.weight") > 0


@pytest.mark.slow
def test_timm_resnet18_one_step(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "timm"
    args = [*SMALL, "--arch", "timm:resnet18", "--global_crop_size", "16", "--local_crop_size", "8",
            "--batch_size_per_gpu", "4", "--max_steps", "1", "--log_every", "1", "--output_dir", str(out)]
    run(args)
    ckpt = load(out / "checkpoint.pth")
    assert ckpt["step"] == 1 and ckpt["model_config"]["arch"] == "timm:resnet18"
    assert ckpt["student"]["backbone.model.conv1.weight"].shape == (64, 1, 7, 7)  # timm takes in_chans=1
    assert ckpt["model_config"]["head"]["in_dim"] == 512 and not any(".fc." in n for n in ckpt["student"])
    assert moved(ckpt, "backbone.model.conv1.weight") > 0
    assert math.isfinite(records(out)[0]["train_loss"])


@pytest.mark.slow
def test_compile_one_step_equals_eager(tmp_path):
    # torch.compile on the CPU takes ~20 s: one run, kept; no local crops, so one view size to compile.
    # SGD with a real lr (updates proportional to the gradient) and --momentum_teacher 1.0 (the teacher
    # keeps the initial weights), so the compiled update can be compared with the eager one.
    args = [*SMALL, "--local_crops_number", "0", "--max_steps", "1", "--log_every", "1", "--optimizer", "sgd",
            "--lr", "20", "--clip_grad", "0", "--weight_decay", "0", "--weight_decay_end", "0",
            "--momentum_teacher", "1.0"]
    compiled, eager = tmp_path / "compiled", tmp_path / "eager"
    result = run([*args, "--compile", "--output_dir", str(compiled)], env={"TORCH_LOGS": "dynamo"})
    # Both forwards really went through dynamo and inductor.
    for module in ("teacher.py", "wrapper.py"):
        assert re.search(rf"torchdynamo start tracing forward .*dino_pytorch/{module}", result.stderr), module
    assert "calling compiler function inductor" in result.stderr
    run([*args, "--output_dir", str(eager)])
    a, b = load(compiled / "checkpoint.pth"), load(eager / "checkpoint.pth")
    assert a["step"] == b["step"] == 1
    assert not any("_orig_mod" in n for n in a["student"])  # plain names: the compiled wrapper isn't saved
    assert a["student"].keys() == b["student"].keys()
    names = trainable_names(a)
    upd_a = torch.cat([(a["student"][n] - a["teacher"][n]).flatten() for n in names])
    upd_b = torch.cat([(b["student"][n] - b["teacher"][n]).flatten() for n in names])
    assert upd_b.norm() > 1e-3
    assert (upd_a - upd_b).norm() <= 1e-3 * upd_b.norm()
    assert records(compiled)[0]["train_loss"] == pytest.approx(records(eager)[0]["train_loss"], rel=1e-4)
