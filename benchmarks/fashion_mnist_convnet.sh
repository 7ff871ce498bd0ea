#!/usr/bin/env bash
# The 60-minute ConvNet recipe of docs/results.md: DINO on 2 CPU cores, 20-NN on the 10k test set.
#   bash benchmarks/fashion_mnist_convnet.sh [output_dir]      (needs `make venv data` first)
# --precision auto: bf16 where the CPU runs it natively (AMX), fp32 elsewhere (docs/training.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/fashion_mnist_convnet}"
exec .venv/bin/python -m dino_pytorch.train \
    --dataset fashion_mnist --arch convnet --width 24 --pool 2 \
    --out_dim 4096 --hidden_dim 512 --bottleneck_dim 128 --use_bn_in_head true \
    --batch_size_per_gpu 128 --local_crops_number 6 --local_crops_scale 0.1 0.4 \
    --lr 0.004 --warmup_steps 200 --momentum_teacher 0.99 --freeze_last_layer 0 \
    --channels_last --precision auto --max_steps 7500 --time_budget_min 56 \
    --knn_every 1000 --knn_train_subset 20000 --knn_test_subset 4000 \
    --num_workers 1 --log_every 50 --no_progress --output_dir "$OUT"
