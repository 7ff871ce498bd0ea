"""What the per-image and batched augmenter tests share: ImageNet statistics and an all-off recipe."""

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Every random op off and an identity crop geometry, so only resize + normalise remain.
ALL_OFF = dict(
    global_crops_scale=(1.0, 1.0),
    local_crops_scale=(1.0, 1.0),
    ratio=(1.0, 1.0),
    flip_prob=0.0,
    color_jitter_prob=0.0,
    grayscale_prob=0.0,
    global_blur_probs=0.0,
    local_blur_prob=0.0,
    global_solarize_probs=0.0,
    local_solarize_prob=0.0,
)
