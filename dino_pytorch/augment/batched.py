"""Batched multi-crop augmentation with per-sample randomness, on the CPU or the GPU.

:class:`BatchedMultiCrop` executes a :class:`~dino_pytorch.augment.MultiCropRecipe` on a whole batch
of images ``(B, C, H, W)`` and returns the same list of views as the per-image transform::

    [global_1, ..., global_G, local_1, ..., local_N]     each (B, C_out, h, w) float32, normalised

Every image of the batch gets its *own* random crop box, flip, jitter factors and order, grayscale,
blur sigma and solarize decision, drawn from the same distribution as the per-image transform.  The
module draws the parameters (:meth:`BatchedMultiCrop.sample_params`, into :class:`ViewParams`) and
hands them to the batch kernels of :mod:`~dino_pytorch.augment.functional`
(:meth:`BatchedMultiCrop.apply_params`), each one vectorised op over the batch or over the rows that
the step applies to.

All random numbers are drawn on the CPU (from a ``torch.Generator`` if one is passed, from one seeded
stream per image with ``seeds=``, else from the global RNG) and only the results move to the images'
device, so the views do not depend on the device or its RNG, and row selection never needs a device
synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union, cast

import torch
from torch import Tensor, nn
from torch.utils.data import default_collate
from torchvision.transforms import InterpolationMode

from ..validate import check_bool, check_int, is_int
from . import functional as AF
from .draws import SeedsLike, Uniforms, check_seeds, sample_boxes
from .gram_crops import split_batch
from .inputs import check_batch, stack_images, to_image_tensor
from .per_image import MultiCropTransform
from .recipe import MultiCropRecipe, RecipeAttributes, ViewSpec, augmenter_signature

__all__ = ["BatchedMultiCrop", "ViewParams", "multicrop_collate", "stack_images"]

# The factor that leaves an image unchanged, per op.
_IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)


@dataclass
class ViewParams:
    """The random parameters of one view for a batch of ``B`` images (all CPU tensors).

    Attributes:
        boxes: ``(B, 4)`` int64 crop boxes ``(top, left, height, width)`` in source pixels.
        flip: ``(B,)`` bool, horizontal flip.
        jitter: ``(B,)`` bool, colour jitter applied.
        factors: ``(B, 4)`` float64 jitter factors (brightness, contrast, saturation, hue); a disabled
            component holds its identity value (1, 1, 1, 0).  Only used where ``jitter``.
        order: ``(B, 4)`` int64, a permutation of ``0..3`` per sample: the order in which the jitter
            ops (0 brightness, 1 contrast, 2 saturation, 3 hue) run.
        grayscale: ``(B,)`` bool, grey conversion applied (always False unless the output has 3 channels).
        blur: ``(B,)`` bool, Gaussian blur applied.
        sigma: ``(B,)`` float64 blur sigma.  Only used where ``blur``.
        solarize: ``(B,)`` bool, solarize applied.
    """

    boxes: Tensor
    flip: Tensor
    jitter: Tensor
    factors: Tensor
    order: Tensor
    grayscale: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor

    @property
    def batch_size(self) -> int:
        return self.boxes.shape[0]


# ---------------------------------------------------------------------------------------------
# the module

# The batch resampler implements these filters; BOX, HAMMING and LANCZOS exist for PIL inputs only.
_SUPPORTED_INTERPOLATION = tuple(AF.RESAMPLE_KERNELS)


class BatchedMultiCrop(RecipeAttributes, nn.Module):
    """DINO multi-crop augmentation for a whole batch, with per-sample random parameters.

    ``module(images)`` with ``images`` of shape ``(B, C, H, W)`` returns
    ``[global_1, ..., global_G, local_1, ..., local_N]`` where each global view is a ``float32``
    tensor ``(B, C_out, *global_crop_size)`` and each local view ``(B, C_out, *local_crop_size)``,
    normalised with ``mean`` / ``std``; ``C_out = len(mean)`` (grey inputs are replicated to 3
    channels, RGB inputs converted with PIL's luma formula for 1 channel, and ``C``-band inputs need
    ``len(mean) == C``).

    Construction: ``BatchedMultiCrop(recipe=recipe)``, or the arguments of
    :class:`~dino_pytorch.augment.MultiCropRecipe` (the same as ``MultiCropTransform``'s), from which
    the recipe is built; :meth:`from_transform` shares a per-image transform's recipe.  The recipe's
    fields read through as attributes (``m.local_crops_number``, ``m.num_views``, ...).  Per view and
    per image, the steps and their probabilities are those of the per-image transform:
    RandomResizedCrop -> flip -> colour jitter (random op order) -> grayscale -> blur -> solarize ->
    normalise.  The views follow the same distribution but are not bit-identical to the per-image
    transform's: this module computes in float32 without rounding to uint8 between steps, and uses
    PIL's luma weights in contrast and saturation (torchvision's tensor kernels use 0.2989).

    Interpolation: NEAREST / NEAREST_EXACT (both pick the source pixel containing the sample point),
    BILINEAR and BICUBIC (default), always antialiased when downscaling like PIL and
    ``antialias=True``: the crop-resize is the same separable filter, in float.

    Inputs: ``uint8`` tensors with values in ``[0, 255]``, or floating tensors with values in
    ``[0, 1]``, on any device; any ``C >= 1`` that suits the recipe (``C == len(mean)``, or grey / RGB
    for a grey / RGB recipe).  For ``C != 3`` saturation, hue and grayscale are skipped, their draws
    still taken, and contrast blends each band with its own mean (docs/augmentation.md,
    "N-channel images").  The views come back on the input's device.  The
    float range is checked on CPU tensors (one min/max pass: a 0-255 float batch, an already
    normalised one or a NaN raises a ValueError), not on GPU tensors, where reading the values
    would synchronise the device each batch: there values outside ``[0, 1]`` are clipped by the
    crop-resize.  Every image needs at least
    :attr:`~dino_pytorch.augment.MultiCropRecipe.min_image_pixels` pixels (``H * W``; 20 for the
    official recipe), so that the smallest crop of the recipe covers a pixel.

    Randomness: all parameters are drawn on the CPU from ``generator`` (a CPU ``torch.Generator``)
    or, when it is None, from torch's global RNG, which DataLoader workers seed per worker.  The same
    generator state gives the same parameters on every device.  With ``seeds=`` (one per image)
    instead, each image's parameters come from its own seeded stream, so they do not depend on the
    batch it is in: key them by the global sample index and a 2-process run draws the views of a
    1-process run (:mod:`~dino_pytorch.augment.draws`).
    """

    def __init__(self, *args: Any, recipe: Optional[MultiCropRecipe] = None, **kwargs: Any) -> None:
        super().__init__()
        self.recipe = MultiCropRecipe.resolve(type(self).__name__, args, kwargs, recipe)
        self.recipe.note_skipped_colour_ops(type(self).__name__)
        interpolation = cast(InterpolationMode, self.recipe.interpolation)  # normalised by the recipe
        if interpolation not in _SUPPORTED_INTERPOLATION:
            names = ", ".join(repr(m.value) for m in _SUPPORTED_INTERPOLATION)
            raise ValueError(
                f"interpolation={interpolation.value!r}, expected one of {names} in BatchedMultiCrop "
                "(the others exist for PIL inputs of MultiCropTransform only)"
            )

    __init__.__signature__ = augmenter_signature()  # type: ignore[attr-defined]

    @classmethod
    def from_transform(cls, transform: MultiCropTransform) -> BatchedMultiCrop:
        """A batched module that shares the recipe of a per-image ``MultiCropTransform``."""
        if not isinstance(transform, MultiCropTransform):
            raise TypeError(f"transform: expected a MultiCropTransform, got {type(transform).__name__}")
        return cls(recipe=transform.recipe)

    # -----------------------------------------------------------------------------------------
    # parameters

    def sample_params(self, batch_size: int, image_size: Union[tuple[int, int], Tensor], *,
                      generator: Optional[torch.Generator] = None,
                      seeds: Optional[SeedsLike] = None) -> list[ViewParams]:
        """Draw the random parameters of every view for a batch, on the CPU.

        Args:
            batch_size: ``B``.
            image_size: ``(H, W)`` shared by the batch, or a ``(B, 2)`` integer tensor of per-image sizes.
            generator: a CPU ``torch.Generator`` for the whole batch; None uses torch's global RNG.
            seeds: instead of ``generator``, one seed per image (a ``(B,)`` integer tensor or ints): image
                ``i``'s parameters come from ``torch.Generator().manual_seed(seeds[i])`` alone, whatever
                the batch around it.
        Returns:
            ``G + N`` :class:`ViewParams`, in view order.
        """
        check_int("batch_size", batch_size, 1)
        sizes = _check_sizes(image_size, batch_size)
        return self._sample_params(sizes, "image_sizes" if isinstance(image_size, Tensor) else "image_size",
                                   generator, seeds)

    def _sample_params(self, sizes: Tensor, size_name: str, generator: Optional[torch.Generator],
                       seeds: Optional[SeedsLike]) -> list[ViewParams]:
        """:meth:`sample_params` for checked ``(B, 2)`` sizes; ``size_name`` names them in errors."""
        batch_size = sizes.shape[0]
        self._check_min_size(sizes, size_name)
        generator = _check_generator(generator)
        if seeds is not None and generator is not None:
            raise TypeError("pass either generator= (one stream for the batch) or seeds= (one per image), not both")
        per_sample = check_seeds(seeds, batch_size) if seeds is not None else None
        draws = Uniforms(batch_size, generator, per_sample, self.recipe.num_views)
        params = [self._sample_view(sizes, spec, draws) for spec in self.recipe.view_specs]
        draws.check_used(self.recipe.num_views)
        return params

    def _check_min_size(self, sizes: Tensor, name: str) -> None:
        """Every ``(H_i, W_i)`` of the (B, 2) CPU sizes holds the recipe's smallest crop."""
        areas = sizes[:, 0] * sizes[:, 1]
        i = int(areas.argmin())
        h, w = (int(v) for v in sizes[i])
        self.recipe.check_image_size(f"{name}[{i}]" if name == "image_sizes" else name, h, w)

    def _sample_view(self, sizes: Tensor, spec: ViewSpec, draws: Uniforms) -> ViewParams:
        r = self.recipe
        batch = sizes.shape[0]
        boxes = sample_boxes(sizes, spec.scale, cast("tuple[float, float]", r.ratio), draws)
        flip = draws.bernoulli(r.flip_prob)
        jitter = draws.bernoulli(r.color_jitter_prob)
        factors = torch.empty(batch, 4, dtype=torch.float64)
        for op, bounds in enumerate(r.jitter_ranges):
            u = draws.uniform(1, *(bounds or (0.0, 1.0)))[:, 0]
            factors[:, op] = u if bounds is not None else _IDENTITY_FACTORS[op]
        # argsort of i.i.d. uniforms is a uniformly random permutation, one per row (ColorJitter
        # draws torch.randperm(4) per image).  float32 draws from a batch generator, as before.
        order = draws.take(4, torch.float32).argsort(dim=1)
        grayscale = draws.bernoulli(r.grayscale_prob) & (r.channels == 3)
        blur = draws.bernoulli(spec.blur_prob, inclusive=True)
        sigma = draws.uniform(1, *cast("tuple[float, float]", r.blur_sigma))[:, 0]
        solarize = draws.bernoulli(spec.solarize_prob)
        return ViewParams(boxes, flip, jitter, factors, order, grayscale, blur, sigma, solarize)

    # -----------------------------------------------------------------------------------------
    # the augmentation

    def forward(self, images: Tensor, *, image_sizes: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None, seeds: Optional[SeedsLike] = None,
                return_params: bool = False) -> Union[list[Tensor], tuple[list[Tensor], list[ViewParams]]]:
        """Augment a batch: ``(B, C, H, W) -> [(B, C_out, gh, gw)] * G + [(B, C_out, lh, lw)] * N``, then, with
        ``gram_teacher_scale``, the G Gram teacher's crops ``(B, C_out, *gram_crop_size)``.

        Args:
            images: ``uint8`` in ``[0, 255]`` or floating in ``[0, 1]``, any device; ``C == len(mean)``, or
                ``C`` in ``{1, 3}`` for a grey or RGB recipe.
            image_sizes: optional ``(B, 2)`` true ``(H_i, W_i)`` of zero-padded images (see
                :func:`stack_images`); crops stay inside each image.
            generator: a CPU ``torch.Generator`` for all draws; None uses torch's global RNG.
            seeds: instead of ``generator``, one seed per image, ``(B,)`` ints: each image's views are
                then a function of its seed alone (see :meth:`sample_params`).
            return_params: also return the drawn :class:`ViewParams` (CPU tensors).
        """
        check_batch(images, self.recipe)
        return_params = check_bool("return_params", return_params)
        batch, height, width = images.shape[0], images.shape[2], images.shape[3]
        if image_sizes is not None:
            sizes = _check_sizes(image_sizes, batch)
            if (sizes[:, 0] > height).any() or (sizes[:, 1] > width).any():
                raise ValueError(
                    f"image_sizes: every (H_i, W_i) must fit in the batch's (H, W) = {(height, width)}"
                )
        else:
            sizes = _check_sizes((height, width), batch)
        params = self._sample_params(sizes, "image_sizes" if image_sizes is not None else "images' (H, W)",
                                     generator, seeds)
        views = self._augment(images, params)
        return (views, params) if return_params else views

    def apply_params(self, images: Tensor, params: Sequence[ViewParams]) -> list[Tensor]:
        """Augment ``images (B, C, H, W)`` with given parameters (one :class:`ViewParams` per view, in
        view order); returns the views as :meth:`forward` does.  ``forward`` is :meth:`sample_params`
        followed by this."""
        check_batch(images, self.recipe)
        if len(params) != self.num_views or any(p.batch_size != images.shape[0] for p in params):
            raise ValueError(
                f"params: expected {self.num_views} ViewParams of batch size {images.shape[0]}, got "
                f"{[p.batch_size for p in params]}"
            )
        height, width = images.shape[2], images.shape[3]
        for i, p in enumerate(params):
            top, left, crop_h, crop_w = p.boxes.unbind(dim=1)
            outside = (top < 0) | (left < 0) | (top + crop_h > height) | (left + crop_w > width)
            if (outside | (crop_h < 1) | (crop_w < 1)).any():
                raise ValueError(
                    f"params[{i}].boxes: every box must be non-empty and lie inside the {height}x{width} images"
                )
        return self._augment(images, params)

    @torch.no_grad()
    def _augment(self, images: Tensor, params: Sequence[ViewParams]) -> list[Tensor]:
        """:meth:`apply_params` on checked inputs; with ``gram_teacher_scale`` the G Gram crops follow
        (:mod:`~dino_pytorch.augment.gram_crops`)."""
        x = AF.to_unit_float(AF.match_channels(images.as_subclass(Tensor), self.recipe.channels))
        grams: list[Tensor] = []
        return [self._view(x, p, spec, grams) for p, spec in zip(params, self.recipe.view_specs)] + grams

    def _view(self, x: Tensor, p: ViewParams, spec: ViewSpec, grams: list[Tensor]) -> Tensor:
        r = self.recipe
        big = None if spec.local else r.gram_crop_size
        view = AF.resized_crop(x, p.boxes, p.flip, big or spec.size, r.interpolation)
        if big is not None:
            gram, view = split_batch(view, spec.size, r)
            grams.append(gram)
        view = self._color_jitter(view, p)
        if r.channels == 3:  # an RGB op: hand-made ViewParams may ask it of grey or band views
            view = AF.apply_rows(view, p.grayscale, lambda v, rows: AF.grayscale(v))
        view = AF.apply_rows(view, p.blur, lambda v, rows: AF.gaussian_blur(v, p.sigma[rows]))
        if spec.solarize_prob > 0.0:
            view = AF.apply_rows(view, p.solarize, lambda v, rows: AF.solarize(v, r.solarize_threshold))
        return AF.normalize(view, r.mean, r.std)

    def _color_jitter(self, x: Tensor, p: ViewParams) -> Tensor:
        """Four steps; at each, every jittered row runs the op its own permutation puts there."""
        for step in range(4):
            for op, bounds in enumerate(self.recipe.jitter_ranges):
                # Disabled components, and saturation / hue on non-RGB output, leave images unchanged.
                if bounds is None or not AF.colour_op_applies(op, x.shape[1]):
                    continue
                mask = p.jitter & (p.order[:, step] == op)
                # apply_rows calls the lambda before the loop moves on, so late binding of `op` is harmless.
                x = AF.apply_rows(
                    x, mask, lambda v, rows: AF.JITTER_OPS[op](v, AF.to_device(p.factors[rows, op], v.device, v.dtype))  # noqa: B023
                )
        return x

    # -----------------------------------------------------------------------------------------
    # DataLoader use

    def collate(self, batch: Sequence[Any]) -> Any:
        """A ``collate_fn`` that augments in the DataLoader worker.

        ``batch`` holds images (uint8 or float ``(C, H, W)`` tensors or ``'RGB'`` / ``'L'`` PIL images,
        sizes may differ) or tuples whose first element is an image.  Returns the list of views, or
        ``[views, *default_collate(rest)]`` for tuples (e.g. ``views, labels = batch``).  Draws use the
        global RNG, which the DataLoader seeds differently in every worker.
        """
        if len(batch) == 0:
            raise ValueError("batch: empty batch")
        with_rest = isinstance(batch[0], (tuple, list))
        images = [to_image_tensor(sample[0] if with_rest else sample, i) for i, sample in enumerate(batch)]
        for i, im in enumerate(images):
            self.recipe.check_image_channels(f"images[{i}]", im.shape[0])
        if len({im.shape[0] for im in images}) > 1:
            # Mixed grey and colour images: give each the output's channel count before stacking.
            images = [AF.match_channels(im.unsqueeze(0), self.recipe.channels)[0] for im in images]
        stacked, sizes = stack_images(images)
        uniform = bool((sizes == sizes[0]).all())
        views = self(stacked, image_sizes=None if uniform else sizes)
        if not with_rest:
            return views
        return [views, *default_collate([tuple(sample[1:]) for sample in batch])]

    def extra_repr(self) -> str:
        return ",\n".join(f"{name}={value!r}" for name, value in self.recipe.settings().items())


def multicrop_collate(batched: BatchedMultiCrop) -> Callable[[Sequence[Any]], Any]:
    """The ``collate_fn`` for a DataLoader whose dataset returns raw images: ``batched.collate``."""
    if not isinstance(batched, BatchedMultiCrop):
        raise TypeError(f"batched: expected a BatchedMultiCrop, got {type(batched).__name__}")
    return batched.collate


# ---------------------------------------------------------------------------------------------
# input checks


def _check_sizes(image_size: Union[tuple[int, int], Tensor], batch_size: int) -> Tensor:
    """``(B, 2)`` int64 CPU sizes from a shared ``(H, W)`` or a per-image tensor."""
    if isinstance(image_size, Tensor):
        if image_size.shape != (batch_size, 2) or image_size.is_floating_point() or image_size.is_complex():
            raise ValueError(
                f"image_sizes: expected a ({batch_size}, 2) integer tensor of (height, width), got "
                f"{image_size.dtype} of shape {tuple(image_size.shape)}"
            )
        sizes = image_size.detach().to("cpu", torch.long)
    elif isinstance(image_size, Sequence) and len(image_size) == 2 and all(map(is_int, image_size)):
        sizes = torch.tensor([[int(v) for v in image_size]], dtype=torch.long).expand(batch_size, 2)
    else:
        raise TypeError(f"image_size={image_size!r}: expected (height, width) ints or a (B, 2) tensor")
    if (sizes < 1).any():
        raise ValueError(f"image_sizes: every height and width must be >= 1, got min {int(sizes.min())}")
    return sizes


def _check_generator(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator: expected a CPU generator (parameters are drawn on the CPU), got device {generator.device}"
        )
    return generator
