"""GramLoss and resize_patch_grid against a float64 reference written from the formula."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from dino_pytorch import GramLoss, resize_patch_grid

CLIPS = {"both": (True, False), "teacher": (False, True), "none": (False, False)}
COMBOS = list(itertools.product([True, False], list(CLIPS), [True, False]))


def reference_loss(student, teacher, apply_norm, clip, img_level):
    """float64: unit rows (norm floored at 1e-12), Grams over explicit index sets, clipped, mean square."""
    s, t = student.double(), teacher.double().detach()
    if apply_norm:
        s = s / torch.sqrt((s * s).sum(-1, keepdim=True)).clamp(min=1e-12)
        t = t / torch.sqrt((t * t).sum(-1, keepdim=True)).clamp(min=1e-12)
    if img_level:  # pairs (n, m) of patches of the same image b
        gs, gt = torch.einsum("bnd,bmd->bnm", s, s), torch.einsum("bnd,bmd->bnm", t, t)
    else:  # pairs (i, j) over all B*N patches of the batch, i = b*N + n
        fs, ft = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        gs, gt = torch.einsum("id,jd->ij", fs, fs), torch.einsum("id,jd->ij", ft, ft)
    zero = torch.zeros((), dtype=torch.float64)
    if clip in ("both", "teacher"):
        gt = torch.where(gt < 0, zero, gt)
    if clip == "both":
        gs = torch.where(gs < 0, zero, gs)
    # clip == "teacher": the student Gram keeps its negatives (DINOv3's student mask is empty).
    return ((gs - gt) ** 2).sum() / gs.numel()


def features(seed, shape=(3, 6, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


@pytest.mark.parametrize("apply_norm,clip,img_level", COMBOS)
def test_value_and_student_gradient_match_the_float64_reference(apply_norm, clip, img_level):
    student, teacher = features(len(clip) + 2 * apply_norm + img_level)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    remove_neg, remove_only_teacher_neg = CLIPS[clip]
    loss = GramLoss(apply_norm, img_level, remove_neg, remove_only_teacher_neg)(student, teacher)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    (grad,) = torch.autograd.grad(loss, student)

    student64 = student.detach().double().requires_grad_(True)
    expected = reference_loss(student64, teacher, apply_norm, clip, img_level)
    (expected_grad,) = torch.autograd.grad(expected, student64)
    assert abs(loss.item() - expected.item()) <= 1e-6 * max(1.0, expected.item())
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)
    assert grad.abs().max() > 0  # the comparison is not between two zero gradients

    # float64 in, float64 computed: agreement to rounding.
    loss64 = GramLoss(apply_norm, img_level, remove_neg, remove_only_teacher_neg)(student64, teacher.double())
    assert loss64.dtype == torch.float64
    assert loss64.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-14)


def test_the_clip_rules_differ_and_the_teacher_gets_no_gradient():
    student, teacher = features(7)
    teacher.requires_grad_(True)
    values = {clip: GramLoss(True, True, *CLIPS[clip])(student, teacher) for clip in CLIPS}
    assert len({round(v.item(), 6) for v in values.values()}) == 3
    assert not values["none"].requires_grad  # student has no grad: the teacher path is cut


def test_flat_patches_at_batch_level_equal_the_flattened_batch():
    student, teacher = features(8)
    loss = GramLoss(img_level=False)
    assert loss(student.flatten(0, 1), teacher.flatten(0, 1)).item() == pytest.approx(loss(student, teacher).item())


def test_both_clip_options_raise_naming_both():
    with pytest.raises(ValueError, match="remove_neg=True and remove_only_teacher_neg=True"):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)
    with pytest.raises(TypeError, match="apply_norm=1"):
        GramLoss(apply_norm=1)


@pytest.mark.parametrize(
    "student,teacher,error,match",
    [
        ([[[1.0]]], torch.ones(1, 1, 1), TypeError, "student_patches is a list"),
        (torch.ones(1, 2, 3, dtype=torch.long), torch.ones(1, 2, 3), TypeError, "dtype torch.int64"),
        (torch.ones(2, 3), torch.ones(2, 3), ValueError, r"student_patches has shape \(2, 3\), expected \(B, N, D\)$"),
        (torch.ones(1, 0, 3), torch.ones(1, 0, 3), ValueError, "no empty dimension"),
        (torch.ones(1, 2, 3), torch.ones(1, 4, 3), ValueError, r"teacher_patches has shape \(1, 4, 3\)"),
    ],
)
def test_bad_inputs_raise_one_line(student, teacher, error, match):
    with pytest.raises(error, match=match) as info:
        GramLoss()(student, teacher)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("to_grid", [(3, 4), (6, 10), (4, 5)])
def test_resize_patch_grid_is_interpolate_on_the_row_major_grid(to_grid):
    patches = torch.randn(2, 4 * 5, 3, generator=torch.Generator().manual_seed(9))
    out = resize_patch_grid(patches, (4, 5), to_grid)
    assert out.shape == (2, to_grid[0] * to_grid[1], 3)
    # Independently: unflatten each channel to its (h, w) image, resize, read back row by row.
    grid = patches.permute(0, 2, 1).reshape(2, 3, 4, 5)
    expected = F.interpolate(grid, size=to_grid, mode="bicubic", align_corners=False, antialias=False)
    expected = expected.reshape(2, 3, -1).permute(0, 2, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    smooth = resize_patch_grid(patches, (4, 5), (2, 2), antialias=True)
    torch.testing.assert_close(
        smooth,
        F.interpolate(grid, size=(2, 2), mode="bicubic", antialias=True).reshape(2, 3, 4).permute(0, 2, 1),
    )


def test_resize_patch_grid_bad_grids():
    patches = torch.ones(1, 6, 2)
    with pytest.raises(ValueError, match=r"from_grid=\(2, 2\), expected h\*w equal to patches' N=6"):
        resize_patch_grid(patches, (2, 2), (1, 1))
    with pytest.raises(TypeError, match="to_grid=3"):
        resize_patch_grid(patches, (2, 3), 3)
    with pytest.raises(ValueError, match=r"to_grid=\(0, 1\)"):
        resize_patch_grid(patches, (2, 3), (0, 1))
