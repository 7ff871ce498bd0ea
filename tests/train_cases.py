"""Flags the training-program tests share: a tiny ViT trained with plain SGD, so a step is
proportional to its gradient (a wrong scale or a summed-instead-of-averaged gradient shows)."""

# No drop path, per-image augmentation (seeded per sample), no clipping or weight decay: two runs
# that should agree differ only by what the test varies. Add --max_steps, --lr, --momentum_teacher.
TINY_VIT_SGD = [
    "--dataset", "fashion_mnist", "--arch", "vit_tiny", "--patch_size", "7", "--out_dim", "128",
    "--hidden_dim", "32", "--bottleneck_dim", "16", "--local_crops_number", "2", "--num_workers", "0",
    "--no_final_knn", "--no_progress", "--warmup_epochs", "0", "--drop_path_rate", "0",
    "--augment", "per_image", "--log_every", "1", "--attention_maps", "0", "--freeze_last_layer", "0",
    "--optimizer", "sgd", "--clip_grad", "0", "--weight_decay", "0", "--weight_decay_end", "0",
    "--saveckp_freq", "0",
]
