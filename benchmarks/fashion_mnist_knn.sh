#!/usr/bin/env bash
# The 60-minute Fashion-MNIST result of docs/results.md: DINO on 2 CPU cores, k-NN on the 10k test set.
#   bash benchmarks/fashion_mnist_knn.sh [output_dir]      (needs `make venv data` first)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/fashion_mnist_60min}"
exec .venv/bin/python -m dino_pytorch.train \
    --dataset fashion_mnist --arch convnet --width 16 --pool 2 \
    --out_dim 4096 --hidden_dim 512 --bottleneck_dim 128 --use_bn_in_head true \
    --batch_size_per_gpu 128 --local_crops_number 6 --local_crops_scale 0.1 0.4 \
    --lr 0.004 --warmup_steps 200 --momentum_teacher 0.99 --freeze_last_layer 0 \
    --channels_last --precision bf16 --max_steps 10800 --time_budget_min 55 \
    --knn_every 2000 --knn_train_subset 20000 --knn_test_subset 4000 \
    --num_workers 1 --log_every 50 --no_progress --output_dir "$OUT"
