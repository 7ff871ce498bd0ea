"""GramLoss: DINOv3's Gram anchoring, which keeps the patch features' similarity structure close to a
frozen "Gram teacher"'s, and :func:`resize_patch_grid` for a Gram teacher run at another resolution.

For student patches ``s`` and teacher patches ``t`` (each row L2-normalised when ``apply_norm``), the
Gram matrices are ``G_s = s s^T`` and ``G_t = t t^T`` taken per image (``img_level=True``: (B, N, N))
or over all the patches of the batch (``img_level=False``: (B*N, B*N)), and

    loss = mean over all Gram entries of (clip_s(G_s) - clip_t(G_t))^2

(the diagonal included). ``remove_neg`` clips the negative entries of both Grams to 0.
``remove_only_teacher_neg`` clips the teacher's; DINOv3's code then also zeroes the student entries
where the student *and the already clipped* teacher are negative, a set that is always empty, so its
student Gram keeps every negative entry, which is what this class reproduces. The teacher Gram is a
target: no gradient flows into ``teacher_patches``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validate import check_bool, check_choice

# F.normalize's default eps, as DINOv3 uses it: an all-zero patch stays zero instead of NaN.
NORM_EPS = 1e-12


def _check_features(name: str, value: object, allow_flat: bool) -> Tensor:
    """A floating (B, N, D) tensor (or (M, D) when ``allow_flat``) with no empty dimension."""
    shape = "(B, N, D) or (M, D)" if allow_flat else "(B, N, D)"
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} is a {type(value).__name__}, expected a {shape} floating-point tensor")
    if not value.is_floating_point():
        raise TypeError(f"{name} has dtype {value.dtype}, expected a {shape} floating-point tensor")
    if value.ndim != 3 and not (allow_flat and value.ndim == 2):
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape}")
    if value.numel() == 0:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape} with no empty dimension")
    return value


def _gram(features: Tensor, apply_norm: bool, img_level: bool) -> Tensor:
    """The Gram matrix of ``features``: (B, N, N) per image, or (M, M) over the flattened batch."""
    if apply_norm:
        features = F.normalize(features, dim=-1, eps=NORM_EPS)
    if not img_level and features.ndim == 3:
        features = features.flatten(0, 1)  # every patch of every image against every other
    return features @ features.transpose(-1, -2)


class GramLoss(nn.Module):
    """DINOv3's Gram anchoring loss between student and (frozen) teacher patch features.

    ``GramLoss()(student_patches, teacher_patches)`` -> 0-dim loss, float32 (float64 when both inputs
    are float64). Shapes and dtypes are checked (metadata only: no device sync), values are not.

    Args:
        apply_norm: L2-normalise every patch feature before the Gram (cosine similarities);
            DINOv3's ``gram.normalized``.
        img_level: one (N, N) Gram per image; False: one (B*N, B*N) Gram over all the batch's
            patches (DINOv3 passes ``gram.img_level`` at call time; here it is fixed at construction).
        remove_neg: clip the negative entries of both the student and the teacher Gram to 0.
        remove_only_teacher_neg: clip the teacher Gram's negative entries to 0 and keep the student's
            (the effect of DINOv3's code, see the module docstring). Not with ``remove_neg``.

    Raises:
        ValueError: ``remove_neg`` and ``remove_only_teacher_neg`` both True.
        TypeError: an option that is not a bool.
    """

    def __init__(
        self,
        apply_norm: bool = True,
        img_level: bool = True,
        remove_neg: bool = True,
        remove_only_teacher_neg: bool = False,
    ) -> None:
        super().__init__()
        self.apply_norm = check_bool("apply_norm", apply_norm)
        self.img_level = check_bool("img_level", img_level)
        self.remove_neg = check_bool("remove_neg", remove_neg)
        self.remove_only_teacher_neg = check_bool("remove_only_teacher_neg", remove_only_teacher_neg)
        if remove_neg and remove_only_teacher_neg:
            # DINOv3 asserts the same: the two are alternative clipping rules, not combinable.
            raise ValueError(
                "remove_neg=True and remove_only_teacher_neg=True, expected at most one of them True"
            )

    def extra_repr(self) -> str:
        return (
            f"apply_norm={self.apply_norm}, img_level={self.img_level}, remove_neg={self.remove_neg}, "
            f"remove_only_teacher_neg={self.remove_only_teacher_neg}"
        )

    def forward(self, student_patches: Tensor, teacher_patches: Tensor) -> Tensor:
        """The Gram anchoring loss.

        Args:
            student_patches: (B, N, D) floating student patch features; with ``img_level=False``
                also (M, D), patches already selected and flattened (DINOv3's masked-token variant).
            teacher_patches: the Gram teacher's features, same shape (resized to the student's grid
                with :func:`resize_patch_grid` if it ran at another resolution); gets no gradient.

        Returns:
            The 0-dim loss: float64 when both inputs are float64, float32 otherwise.

        Raises:
            TypeError: an input that is not a floating-point tensor.
            ValueError: a wrong or empty shape, differing shapes or devices.
        """
        _check_features("student_patches", student_patches, allow_flat=not self.img_level)
        _check_features("teacher_patches", teacher_patches, allow_flat=not self.img_level)
        if student_patches.shape != teacher_patches.shape:
            raise ValueError(
                f"teacher_patches has shape {tuple(teacher_patches.shape)}, expected the shape of "
                f"student_patches {tuple(student_patches.shape)}"
            )
        if student_patches.device != teacher_patches.device:
            raise ValueError(
                f"teacher_patches is on {teacher_patches.device}, expected student_patches' device "
                f"{student_patches.device}"
            )
        both64 = student_patches.dtype == torch.float64 and teacher_patches.dtype == torch.float64
        dtype = torch.float64 if both64 else torch.float32  # DINOv3 casts to float32: no bf16 Gram
        with torch.autocast(device_type=student_patches.device.type, enabled=False):
            with torch.no_grad():  # the teacher Gram is a fixed target
                target = _gram(teacher_patches.to(dtype), self.apply_norm, self.img_level)
            student = _gram(student_patches.to(dtype), self.apply_norm, self.img_level)
            if self.remove_neg or self.remove_only_teacher_neg:
                target = target.clamp(min=0.0)
            if self.remove_neg:
                # where(), not clamp(): zero gradient below 0 and 1 at exactly 0, as DINOv3's masked
                # in-place assignment gives.
                student = torch.where(student < 0, torch.zeros_like(student), student)
            return F.mse_loss(student, target)


def resize_patch_grid(
    patches: Tensor,
    from_grid: Sequence[int],
    to_grid: Sequence[int],
    *,
    mode: str = "bicubic",
    antialias: bool = False,
) -> Tensor:
    """Resize a row-major patch grid, as DINOv3 resizes its Gram teacher's output to the student's.

    DINOv3 runs the Gram teacher on larger crops (e.g. 512 px for 256 px student crops), then
    resizes the teacher's final-norm patch tokens, before the loss normalises them: the tokens are
    laid out as a (D, h, w) image and interpolated with ``align_corners=False`` (``mode`` and
    ``antialias`` are its ``gram.global_teacher_resize_method`` / ``_antialias``: bicubic and False
    in all of its configs).

    Args:
        patches: (B, h*w, D) floating patch features, row-major over the grid.
        from_grid: the grid ``(h, w)`` of ``patches``.
        to_grid: the grid ``(h', w')`` to resize to.
        mode: the ``torch.nn.functional.interpolate`` mode.
        antialias: interpolate's ``antialias`` (only for bilinear / bicubic downsampling).

    Returns:
        (B, h'*w', D) patch features, row-major, dtype of ``patches``.

    Raises:
        TypeError: ``patches`` not a floating-point tensor, a grid not a pair of ints.
        ValueError: a wrong shape, a grid that does not match N, a non-positive grid size.
    """
    _check_features("patches", patches, allow_flat=False)
    source = _check_grid("from_grid", from_grid)
    target = _check_grid("to_grid", to_grid)
    check_choice("mode", mode, ("nearest", "bilinear", "bicubic", "area", "nearest-exact"))
    check_bool("antialias", antialias)
    if patches.shape[1] != source[0] * source[1]:
        raise ValueError(
            f"from_grid={tuple(from_grid)!r}, expected h*w equal to patches' N={patches.shape[1]}"
        )
    if source == target:
        return patches
    grid = patches.transpose(1, 2).unflatten(-1, source)  # (B, D, h, w): channels first, as interpolate wants
    align = None if mode in ("nearest", "area", "nearest-exact") else False
    grid = F.interpolate(grid, size=target, mode=mode, align_corners=align, antialias=antialias)
    return grid.flatten(-2, -1).transpose(1, 2)


def _check_grid(name: str, value: object) -> tuple[int, int]:
    """A pair of positive ints ``(h, w)``."""
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name}={value!r}, expected a pair of ints (h, w)")
    if value[0] < 1 or value[1] < 1:
        raise ValueError(f"{name}={tuple(value)!r}, expected a pair of positive ints (h, w)")
    return int(value[0]), int(value[1])
