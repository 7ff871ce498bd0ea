"""IBOTPatchLoss against DINOv2's iBOTPatchLoss (tests/reference_dinov2_ibot.py) and the formula."""
import math
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dino_pytorch
from dino_pytorch import IBOTPatchLoss
from dino_pytorch.nonfinite import NonFiniteError
from reference_dinov2_ibot import iBOTPatchLoss

K, N, TEMP = 64, 16, 0.07
COUNTS = (5, 0, 3, 9, 0, 1)  # 2B = 6 global crops; two without a mask count in the denominator


def make_masks(counts=COUNTS, seed=0):
    """(2B, N) bool masks with ``counts[i]`` masked patches in image i, at random places."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(len(counts), N, dtype=torch.bool)
    for i, c in enumerate(counts):
        masks[i, torch.randperm(N, generator=g)[:c]] = True
    return masks


def make_batch(counts=COUNTS, seed=0, dtype=torch.float32):
    """masks, (M, K) student and teacher logits, (1, K) centre."""
    masks = make_masks(counts, seed)
    g = torch.Generator().manual_seed(seed + 1)
    m = int(masks.sum())
    student = (3 * torch.randn(m, K, generator=g)).to(dtype)
    teacher = torch.randn(m, K, generator=g).to(dtype)
    center = 0.3 * torch.randn(1, K, generator=g)
    return masks, student, teacher, center


def rel(a, b):
    """max |a - b| / max |b|: the relative difference of two tensors."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def ours_loss(student, teacher, masks, center=None, **kwargs):
    loss_fn = IBOTPatchLoss(K, teacher_temp=TEMP, **kwargs)
    if center is not None:
        loss_fn.center.copy_(center)
    s = student.detach().clone().requires_grad_()
    loss = loss_fn(s, teacher, masks)
    loss.backward()
    return loss, s.grad, loss_fn


def official_loss(student, teacher, masks, centering, center=None):
    """DINOv2's path in SSLMetaArch: targets, then forward_masked with the collate's masks_weight."""
    official = iBOTPatchLoss(K, student_temp=0.1)
    m = student.shape[0]
    if centering == "centering":
        official.center = center.reshape(1, 1, K).clone()
        probs = official.softmax_center_teacher(teacher.unsqueeze(0), teacher_temp=TEMP).squeeze(0)
    else:
        probs = official.sinkhorn_knopp_teacher(teacher, TEMP, n_masked_patches_tensor=torch.tensor([m]))
    weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    s = student.detach().clone().requires_grad_()
    loss = official.forward_masked(s, probs, masks, n_masked_patches=m, masks_weight=weights)
    loss.backward()
    return loss, s.grad


def naive_loss(student, teacher, masks, center, temp=TEMP, student_temp=0.1):
    """The formula in float64, patch by patch: sum_i sum_{j in M_i} CE_j / |M_i|, over 2B."""
    total, row = torch.zeros((), dtype=torch.float64), 0
    for i in range(masks.shape[0]):
        n_i = int(masks[i].sum())
        for _ in range(n_i):
            target = torch.softmax((teacher[row].double() - center[0].double()) / temp, dim=-1)
            log_p = torch.log_softmax(student[row] / student_temp, dim=-1)
            total = total - (target * log_p).sum() / n_i
            row += 1
    return total / masks.shape[0]


@pytest.fixture
def no_world(monkeypatch):
    """The official sinkhorn_knopp_teacher all-reduces unguarded: a no-op stands in for one process."""
    monkeypatch.setattr(dist, "all_reduce", lambda *args, **kwargs: None)


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_equals_official_forward_masked(centering, no_world):
    masks, student, teacher, center = make_batch()
    loss, grad, _ = ours_loss(student, teacher, masks, center, centering=centering)
    ref_loss, ref_grad = official_loss(student, teacher, masks, centering, center)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert rel(loss, ref_loss) <= 1e-6
    assert rel(grad, ref_grad) <= 1e-6


def test_equals_float64_formula():
    masks, student, teacher, center = make_batch(seed=3)
    s64 = student.double().requires_grad_()
    ref = naive_loss(s64, teacher, masks, center)
    ref.backward()
    loss, grad, _ = ours_loss(student, teacher, masks, center)
    assert rel(loss, ref) <= 1e-6 and rel(grad, s64.grad) <= 1e-6
    # float64 logits stay float64 (the targets are float32, as DINOLoss's).
    loss64, grad64, _ = ours_loss(student.double(), teacher.double(), masks, center)
    assert loss64.dtype == torch.float64 and grad64.dtype == torch.float64
    assert rel(loss64, ref) <= 1e-6 and rel(grad64, s64.grad) <= 1e-6


def test_center_update_equals_official_one_process():
    masks, student, teacher, center = make_batch(seed=5)
    _, _, ours = ours_loss(student, teacher, masks, center)
    official = iBOTPatchLoss(K)
    official.center = center.reshape(1, 1, K).clone()
    # SSLMetaArch: update_center on the (1, M, K) masked teacher logits, applied at the next call.
    official.update_center(teacher.unsqueeze(0))
    official.apply_center_update()
    assert rel(ours.center, official.center.reshape(1, K)) <= 1e-6
    # The documented difference: over ranks, ours is the exact mean of all patches, DINOv2's the mean
    # of per-rank means. Two "ranks" of 3 and 15 patches, fed as micro-batches of a manual update:
    manual = IBOTPatchLoss(K, center_update="manual")
    manual.accumulate_center(teacher[:3])
    manual.accumulate_center(teacher[3:])
    manual.update_center()
    exact = 0.1 * teacher.mean(0, keepdim=True)
    mean_of_means = 0.1 * (teacher[:3].mean(0) + teacher[3:].mean(0)) / 2
    assert rel(manual.center, exact) <= 1e-6 and rel(manual.center, mean_of_means) > 1e-2


def test_official_center_layout_loads():
    official = iBOTPatchLoss(K)
    official.center = torch.randn(1, 1, K)
    ours = IBOTPatchLoss(K)
    ours.load_state_dict(official.state_dict())
    assert torch.equal(ours.center, official.center.reshape(1, K))
    assert list(ours.state_dict()) == ["center"]


def test_gradient_accumulation_manual_center_equals_one_big_batch():
    batches = [make_batch(counts=COUNTS[i:] + COUNTS[:i], seed=10 + i) for i in range(4)]
    micro = IBOTPatchLoss(K, teacher_temp=TEMP, center_update="manual")
    students = [b[1].clone().requires_grad_() for b in batches]
    losses = []
    for (masks, _, teacher, _), s in zip(batches, students):
        loss = micro(s, teacher, masks)
        (loss / 4).backward()
        losses.append(loss.detach())
    micro.update_center()
    big = IBOTPatchLoss(K, teacher_temp=TEMP)
    big_student = torch.cat([b[1] for b in batches]).requires_grad_()
    big_loss = big(big_student, torch.cat([b[2] for b in batches]), torch.cat([b[0] for b in batches]))
    big_loss.backward()
    assert rel(torch.stack(losses).mean(), big_loss) <= 1e-6
    assert rel(torch.cat([s.grad for s in students]), big_student.grad) <= 1e-6
    assert rel(micro.center, big.center) <= 1e-6 and big.center.abs().sum() > 0


def test_nan_teacher_logit_is_flagged_and_leaves_the_center():
    masks, student, teacher, center = make_batch(seed=7)
    teacher[4, 2] = float("nan")
    loss_fn = IBOTPatchLoss(K, teacher_temp=TEMP)
    loss_fn.center.copy_(center)
    with pytest.warns(RuntimeWarning, match="IBOTPatchLoss: non-finite loss.*1 of 18 teacher rows") as record:
        loss = loss_fn(student, teacher, masks)
    assert record[0].filename == __file__  # the warning points at the caller's line
    assert not torch.isfinite(loss) and bool(loss_fn.nonfinite.found)
    assert torch.equal(loss_fn.center, center)
    strict = IBOTPatchLoss(K, on_nonfinite="raise")
    with pytest.raises(NonFiniteError, match="IBOTPatchLoss"):
        strict(student, teacher, masks)
    assert torch.equal(strict.center, torch.zeros(1, K))


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_no_masked_patch_is_a_zero_loss_that_backpropagates(centering):
    masks = torch.zeros(6, N, dtype=torch.bool)
    student = torch.randn(0, K, requires_grad=True)
    loss_fn = IBOTPatchLoss(K, centering=centering)
    loss_fn.center.fill_(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = loss_fn(student, torch.randn(0, K), masks)
    loss.backward()
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert student.grad is not None and student.grad.shape == (0, K)
    assert torch.equal(loss_fn.center, torch.full((1, K), 0.5)) and not bool(loss_fn.nonfinite.found)


def test_mask_count_mismatch_names_both():
    masks, student, teacher, _ = make_batch(seed=2)
    with pytest.raises(ValueError, match=r"masks has 18 masked patches but the patch logits have M=17 rows"):
        IBOTPatchLoss(K)(student[:17], teacher[:17], masks)


def test_mask_count_mismatch_without_host_read_poisons_the_loss(monkeypatch):
    # On CUDA (or compiled) the count is not read on the host: the loss is NaN, flagged, nothing moves.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    masks, student, teacher, _ = make_batch(seed=2)
    loss_fn = IBOTPatchLoss(K)
    loss = loss_fn(student[:17], teacher[:17], masks)
    assert math.isnan(loss.item()) and bool(loss_fn.nonfinite.found)
    assert torch.equal(loss_fn.center, torch.zeros(1, K))


def test_temperature_schedule_and_override():
    masks, student, teacher, center = make_batch(seed=4)
    loss_fn = IBOTPatchLoss(K, teacher_temp=TEMP, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=3,
                            nepochs=10, center_update="manual")
    loss_fn.center.copy_(center)
    at_epoch = loss_fn(student, teacher, masks, epoch=1)
    assert rel(at_epoch, naive_loss(student, teacher, masks, center, temp=0.055)) <= 1e-6
    overridden = loss_fn(student, teacher, masks, teacher_temp=0.06)
    assert rel(overridden, naive_loss(student, teacher, masks, center, temp=0.06)) <= 1e-6
    with pytest.raises(ValueError, match="epoch"):
        loss_fn(student, teacher, masks)
    assert IBOTPatchLoss(K, teacher_temp=0.07).teacher_temp_at(None) == 0.07  # warm-up defaults to it


def test_eval_mode_leaves_the_center():
    masks, student, teacher, _ = make_batch(seed=6)
    loss_fn = IBOTPatchLoss(K).eval()
    loss_fn(student, teacher, masks)
    assert torch.equal(loss_fn.center, torch.zeros(1, K))


def _bad_calls():
    masks, student, teacher, _ = make_batch(seed=1)
    return [
        ("student_patch_logits", TypeError, (student.tolist(), teacher, masks)),
        ("student_patch_logits", TypeError, (student.long(), teacher, masks)),
        ("student_patch_logits", ValueError, (student[:, :-1], teacher[:, :-1], masks)),
        ("student_patch_logits", ValueError, (student.unsqueeze(0), teacher, masks)),
        ("teacher_patch_logits", TypeError, (student, teacher.long(), masks)),
        ("teacher_patch_logits", ValueError, (student, teacher[:-1], masks)),
        ("masks", TypeError, (student, teacher, masks.long())),
        ("masks", ValueError, (student, teacher, masks.flatten())),
        ("masks", ValueError, (student[:0], teacher[:0], masks[:0])),
        ("masks", TypeError, (student, teacher, None)),
    ]


@pytest.mark.parametrize("index", range(10))
def test_bad_inputs_raise_naming_the_argument(index):
    name, error, args = _bad_calls()[index]
    with pytest.raises(error, match=name):
        IBOTPatchLoss(K)(*args)


@pytest.mark.parametrize("kwargs, name", [
    ({"out_dim": 0}, "out_dim"), ({"out_dim": K, "student_temp": 0.0}, "student_temp"),
    ({"out_dim": K, "teacher_temp": -1.0}, "teacher_temp"), ({"out_dim": K, "centering": "mean"}, "centering"),
    ({"out_dim": K, "center_momentum": 1.5}, "center_momentum"), ({"out_dim": K, "on_nonfinite": "x"}, "on_nonfinite"),
])
def test_bad_constructor_arguments_raise_naming_them(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        IBOTPatchLoss(**kwargs)


def test_exported():
    assert dino_pytorch.IBOTPatchLoss is IBOTPatchLoss and "IBOTPatchLoss" in dino_pytorch.__all__


# -- two gloo processes: half the images each == one process with all of them --------------------
TWO_RANK_COUNTS = {"both": (5, 0, 3, 9, 0, 1, 7, 2), "rank 1 unmasked": (5, 0, 3, 9, 0, 0, 0, 0)}


def _two_rank_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {}
        for case, counts in TWO_RANK_COUNTS.items():
            masks, student, teacher, center = make_batch(counts, seed=20)
            rows = int(masks[:4].sum())  # rank 0 holds images 0-3 and their patches, which come first
            mine = slice(0, rows) if rank == 0 else slice(rows, None)
            for centering in ("centering", "sinkhorn_knopp"):
                loss, grad, loss_fn = ours_loss(student[mine], teacher[mine], masks[4 * rank:4 * rank + 4],
                                                center, centering=centering)
                results[case, centering] = (loss.detach(), grad, loss_fn.center.clone())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_two_rank_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for case, counts in TWO_RANK_COUNTS.items():
        masks, student, teacher, center = make_batch(counts, seed=20)
        for centering in ("centering", "sinkhorn_knopp"):
            loss, grad, loss_fn = ours_loss(student, teacher, masks, center, centering=centering)
            (loss0, grad0, center0), (loss1, grad1, center1) = ranks[0][case, centering], ranks[1][case, centering]
            # DDP averages the ranks' gradients; each rank's loss is over its own 2B / 2 crops.
            assert rel((loss0 + loss1) / 2, loss) <= 1e-6
            assert rel(torch.cat([grad0, grad1]) / 2, grad) <= 1e-6
            assert rel(center0, loss_fn.center) <= 1e-6 and torch.equal(center0, center1)
