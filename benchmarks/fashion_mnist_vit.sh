#!/usr/bin/env bash
# The ViT recipe of docs/results.md: DINO on 2 CPU cores, 20-NN on the 10k test set and the share of
# the last block's CLS attention on the garment.
#   bash benchmarks/fashion_mnist_vit.sh [output_dir]      (needs `make venv data` first)
# fp32 on purpose: for this small ViT a bf16 step took 1.4x the fp32 one even with AMX (casts
# around small matmuls; docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/fashion_mnist_vit}"
exec .venv/bin/python -m dino_pytorch.train \
    --dataset fashion_mnist --arch vit_tiny --patch_size 4 --vit_depth 4 --vit_embed_dim 96 \
    --drop_path_rate 0 --out_dim 4096 --hidden_dim 512 --bottleneck_dim 128 --use_bn_in_head true \
    --batch_size_per_gpu 64 --local_crops_number 4 --local_crops_scale 0.1 0.4 \
    --lr 0.004 --warmup_steps 300 --momentum_teacher 0.99 --freeze_last_layer 0 \
    --precision fp32 --max_steps 8000 --time_budget_min 50 \
    --knn_every 1000 --knn_train_subset 10000 --knn_test_subset 2000 \
    --num_workers 1 --log_every 50 --no_progress --output_dir "$OUT"
