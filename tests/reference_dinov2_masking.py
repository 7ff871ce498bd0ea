"""DINOv2's block masking and the mask part of its collate, as the reference for tests/test_masking.py.

Copied from facebookresearch/dinov2 at commit b8931f7bf91576930313be2c6d6af376033b35f0:
  - ``MaskingGenerator`` from dinov2/data/masking.py (``__repr__`` and ``get_shape`` left out);
  - the mask lines of ``collate_data_and_cast`` from dinov2/data/collate.py.
Copyright (c) Meta Platforms, Inc. and affiliates. Licensed under the Apache License, Version 2.0
(http://www.apache.org/licenses/LICENSE-2.0); the licence's notice is kept here as it requires.

Changes, none to the logic: the module-level ``random`` calls go through a ``random.Random``
instance passed in (so a test never touches Python's global random state), and the collate's
mask lines are wrapped in a function of their own. Tests only: never imported by the package.
"""
import math
import random

import numpy as np
import torch


class MaskingGenerator:
    def __init__(
        self,
        input_size,
        num_masking_patches=None,
        min_num_patches=4,
        max_num_patches=None,
        min_aspect=0.3,
        max_aspect=None,
        rng=None,
    ):
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size

        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches

        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches

        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = rng if rng is not None else random.Random(0)

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)

                num_masked = mask[top : top + h, left : left + w].sum()
                # Overlap
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1

                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches=0):
        mask = np.zeros(shape=(self.height, self.width), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)

            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            else:
                mask_count += delta

        return mask


def collate_masks(B, mask_ratio_tuple, mask_probability, n_tokens, mask_generator, rng):
    """The mask lines of ``collate_data_and_cast``: (collated_masks, masks_weight, upperbound)."""
    N = n_tokens
    n_samples_masked = int(B * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)
    upperbound = 0
    masks_list = []
    for i in range(0, n_samples_masked):
        prob_min = probs[i]
        prob_max = probs[i + 1]
        masks_list.append(torch.BoolTensor(mask_generator(int(N * rng.uniform(prob_min, prob_max)))))
        upperbound += int(N * prob_max)
    for i in range(n_samples_masked, B):  # noqa: B007  (verbatim)
        masks_list.append(torch.BoolTensor(mask_generator(0)))

    rng.shuffle(masks_list)

    collated_masks = torch.stack(masks_list).flatten(1)
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return collated_masks, masks_weight, upperbound
