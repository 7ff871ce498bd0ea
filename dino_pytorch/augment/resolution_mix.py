"""DINOv3's high-resolution stage: one (global, local, Gram-teacher) crop-size triple per batch.

DINOv3's ``high_res_adapt`` config lists crop sizes and mix ratios (``crops.global_crops_size``,
``local_crops_size``, ``gram_teacher_crops_size``, ``global_local_crop_pairs_ratios``); every batch
is made at one triple, triple ``i`` drawn with probability ``ratios[i] / sum(ratios)``.  A
:class:`ResolutionMix` holds the lists and draws the triple of a batch; the augmenters then make
the crops directly at the drawn sizes, from one :class:`~dino_pytorch.augment.MultiCropRecipe` per
triple (:meth:`ResolutionMix.recipes`):

* on the batch: :class:`MixedResolutionCrops` holds one
  :class:`~dino_pytorch.augment.BatchedMultiCrop` per triple, ``crops.at(step, micro)`` the batch's;
* per image in DataLoader workers: :class:`MixedResolutionBatchSampler` hands each item its batch's
  triple index with its key, ``(triple_index, key)``, and :class:`ByTripleDataset` sends the item to
  the per-triple dataset (one :class:`~dino_pytorch.datasets.SeededTransform` around a
  :class:`~dino_pytorch.augment.MultiCropTransform` per triple).  The crops are made at their size
  (no resize of finished crops), so each triple's views are exactly what a run with those sizes
  makes from the same per-sample seeds.

The draw is a pure function of ``(seed, step, micro)`` (:meth:`ResolutionMix.index`): the same on
every rank (the rank is not an input, so all ranks make the batch at one size, as they must for the
same forward), whatever the worker count, and the same after a resume.  DINOv3 differs: it builds
one data loader per triple (each with its own seed) and a ``CombinedDataLoader`` draws the loader
of each batch from one ``numpy`` generator seeded once (65537) and advanced batch by batch, so a
resumed run starts that stream again and its sizes differ from the uninterrupted run's; and the
images a batch holds depend on which loaders were drawn before.  Here one sampler orders the
images whatever the sizes, and only the crop sizes follow the draw.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Protocol

from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

from ..validate import check_int, is_int, is_number
from .batched import BatchedMultiCrop
from .recipe import MultiCropRecipe

__all__ = ["SizeTriple", "ResolutionMix", "MixedResolutionCrops", "MixedResolutionBatchSampler", "ByTripleDataset"]


class SizeTriple(NamedTuple):
    """The crop sizes of one batch, in pixels (square crops)."""

    global_size: int
    local_size: int
    gram_size: Optional[int]
    """The Gram teacher's crops (DINOv3's ``gram_teacher_crops_size``), or None: the recipe's own."""


def _sizes(name: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise TypeError(f"{name}={values!r}, expected a non-empty sequence of ints >= 1")
    for value in values:
        if not is_int(value) or value < 1:
            raise ValueError(f"{name}={list(values)!r}, expected ints >= 1 (got {value!r})")
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class ResolutionMix:
    """Crop-size triples and their mix ratios; the triple of each batch is drawn from ``(seed, step, micro)``.

    Args:
        global_sizes: the global crops' side per triple (DINOv3's ``crops.global_crops_size``), ints >= 1.
        local_sizes: the local crops' side per triple (``crops.local_crops_size``), same length.
        ratios: each triple's share of the batches (``crops.global_local_crop_pairs_ratios``), numbers >= 0
            with a sum > 0; normalised by their sum (a ratio of 0 is never drawn).
        gram_sizes: the Gram teacher's crop side per triple (``crops.gram_teacher_crops_size``), same
            length, or None: the recipe's ``gram_teacher_scale`` (if any) applies to each global size.
        seed: the run's seed; the draws of two seeds are independent.

    Raises:
        TypeError, ValueError: naming the argument, the value and what was expected.
    """

    global_sizes: Sequence[int]
    local_sizes: Sequence[int]
    ratios: Sequence[float]
    gram_sizes: Optional[Sequence[int]] = None
    seed: int = 0

    def __post_init__(self) -> None:
        global_sizes = _sizes("global_sizes", self.global_sizes)
        count = len(global_sizes)
        local_sizes = _sizes("local_sizes", self.local_sizes)
        gram_sizes = None if self.gram_sizes is None else _sizes("gram_sizes", self.gram_sizes)
        ratios = self.ratios
        if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence):
            raise TypeError(f"ratios={ratios!r}, expected a sequence of numbers >= 0")
        for name, values in (("local_sizes", local_sizes), ("gram_sizes", gram_sizes), ("ratios", ratios)):
            if values is not None and len(values) != count:
                raise ValueError(f"{name}={list(values)!r} has {len(values)} entries, expected {count}, one per "
                                 f"global size (global_sizes={list(global_sizes)!r})")
        for r in ratios:
            if not is_number(r) or not math.isfinite(r) or r < 0:
                kind = ValueError if is_number(r) else TypeError
                raise kind(f"ratios={list(ratios)!r}, expected finite numbers >= 0 (got {r!r})")
        ratios = tuple(float(r) for r in ratios)
        if sum(ratios) <= 0:
            raise ValueError(f"ratios={list(ratios)!r}, expected numbers >= 0 with a sum > 0")
        seed = check_int("seed", self.seed, error=TypeError)
        for name, value in (("global_sizes", global_sizes), ("local_sizes", local_sizes), ("gram_sizes", gram_sizes),
                            ("ratios", ratios), ("seed", seed)):
            object.__setattr__(self, name, value)

    # -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """The number of triples."""
        return len(self.global_sizes)

    @property
    def triples(self) -> list[SizeTriple]:
        """The triples, in order."""
        grams: Sequence[Optional[int]] = self.gram_sizes or [None] * len(self)
        return [SizeTriple(g, loc, gram) for g, loc, gram in zip(self.global_sizes, self.local_sizes, grams)]

    @property
    def probabilities(self) -> tuple[float, ...]:
        """``ratios / sum(ratios)``: the chance of each triple per batch."""
        total = sum(self.ratios)
        return tuple(r / total for r in self.ratios)

    def index(self, step: int, micro: int = 0) -> int:
        """The triple index of optimizer step ``step``'s micro-batch ``micro`` (>= 0 both).

        A pure function of ``(seed, step, micro)``: a 53-bit uniform ``u`` from a hash of the three, and
        the first ``i`` whose cumulative ratio exceeds ``u * sum(ratios)``.
        """
        step, micro = check_int("step", step, 0), check_int("micro", micro, 0)
        digest = hashlib.blake2b(f"resolution-mix/{self.seed}/{step}/{micro}".encode(), digest_size=8).digest()
        u = (int.from_bytes(digest, "little") >> 11) * 2.0**-53  # in [0, 1)
        cumulative, total = [], 0.0
        for r in self.ratios:
            total += r
            cumulative.append(total)
        found = bisect.bisect_right(cumulative, u * total)
        last = max(i for i, r in enumerate(self.ratios) if r > 0)  # u * total may round up to total
        return min(found, last)

    def triple(self, step: int, micro: int = 0) -> SizeTriple:
        """The :class:`SizeTriple` of ``(step, micro)``: ``triples[index(step, micro)]``."""
        return self.triples[self.index(step, micro)]

    def recipes(self, recipe: MultiCropRecipe) -> list[MultiCropRecipe]:
        """One recipe per triple: ``recipe`` with its global and local crop sizes, and with a Gram size,
        ``gram_teacher_scale = gram_size / global_size`` (so its ``gram_crop_size`` is the Gram size)."""
        if not isinstance(recipe, MultiCropRecipe):
            raise TypeError(f"recipe={recipe!r}, expected a MultiCropRecipe")
        made = []
        for t in self.triples:
            scale = recipe.gram_teacher_scale if t.gram_size is None else t.gram_size / t.global_size
            made.append(dataclasses.replace(recipe, global_crop_size=t.global_size, local_crop_size=t.local_size,
                                            gram_teacher_scale=scale))
        return made


# ---------------------------------------------------------------------------------------------
# the batched augmenter


class MixedResolutionCrops(nn.Module):
    """One :class:`~dino_pytorch.augment.BatchedMultiCrop` per triple of ``mix``, from ``recipe``.

    ``crops.at(step, micro)`` is the augmenter of that micro-batch's triple; call it as any
    ``BatchedMultiCrop``: ``(B, C, H, W) -> [(B, C, g, g)] * G + [(B, C, l, l)] * N`` (+ the Gram crops).
    ``crops(images, step=..., micro=..., **kwargs)`` does both.
    """

    def __init__(self, mix: ResolutionMix, recipe: MultiCropRecipe) -> None:
        super().__init__()
        if not isinstance(mix, ResolutionMix):
            raise TypeError(f"mix={mix!r}, expected a ResolutionMix")
        self.mix = mix
        self.augmenters = nn.ModuleList(BatchedMultiCrop(recipe=r) for r in mix.recipes(recipe))

    def at(self, step: int, micro: int = 0) -> BatchedMultiCrop:
        """The augmenter of ``(step, micro)``'s triple."""
        augmenter: BatchedMultiCrop = self.augmenters[self.mix.index(step, micro)]  # type: ignore[assignment]
        return augmenter

    def forward(self, images: Tensor, *, step: int, micro: int = 0, **kwargs: Any) -> Any:
        """``self.at(step, micro)(images, **kwargs)``."""
        return self.at(step, micro)(images, **kwargs)


# ---------------------------------------------------------------------------------------------
# the per-image augmenter, in DataLoader workers


class _PlacedSampler(Protocol):
    """What :class:`MixedResolutionBatchSampler` reads of a :class:`~dino_pytorch.sampler.ResumableSampler`."""

    epoch: int
    start_batch: int
    batch_size: int

    @property
    def batches_per_epoch(self) -> int: ...

    def __iter__(self) -> Iterator[int]: ...

    def __len__(self) -> int: ...


class MixedResolutionBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``sampler``'s keys, each key paired with its batch's triple index: ``[(i, key), ...]``.

    Batch ``b`` of the epoch (counted from 0 at its start, past ``sampler.start_batch`` on a resume) is
    micro-batch ``b % grad_accum_steps`` of step ``epoch * steps_per_epoch + b // grad_accum_steps``,
    ``steps_per_epoch = batches_per_epoch // grad_accum_steps`` (dino-train's numbering), and its triple is
    ``mix.index(step, micro)``: the index the batched path draws for the same batch.  Use it as a
    DataLoader's ``batch_sampler`` over a :class:`ByTripleDataset`.
    """

    def __init__(self, sampler: _PlacedSampler, mix: ResolutionMix, grad_accum_steps: int = 1) -> None:
        self.sampler, self.mix = sampler, mix
        self.grad_accum_steps = check_int("grad_accum_steps", grad_accum_steps, 1)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s, accum = self.sampler, self.grad_accum_steps
        steps_per_epoch = s.batches_per_epoch // accum
        keys = list(iter(s))
        for j in range(len(keys) // s.batch_size):
            b = s.start_batch + j
            index = self.mix.index(s.epoch * steps_per_epoch + b // accum, b % accum)
            yield [(index, key) for key in keys[j * s.batch_size:(j + 1) * s.batch_size]]

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.batch_size


class ByTripleDataset(Dataset):
    """``dataset[(i, key)]`` is ``datasets[i][key]``: one dataset per triple (the same images, each with
    its triple's transform), the triple chosen per batch by :class:`MixedResolutionBatchSampler`."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        if len(datasets) == 0:
            raise ValueError("datasets=[], expected one dataset per triple")
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return len(self.datasets[0])  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, key = item
        return self.datasets[index][key]
