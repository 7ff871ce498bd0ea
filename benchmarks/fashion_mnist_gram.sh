#!/usr/bin/env bash
# Issue 19's Gram anchoring measure: a finished ViT run continued for the same wall time with and
# without Gram anchoring (a Gram teacher taken at the start, DINOv3's recipe values: per-image Grams,
# negatives kept, the Gram teacher on 2x crops), both at once, one thread each; then the 20-NN of the
# CLS and mean patch tokens and the patch-similarity drift mean |G_end - G_start| of both.
#   bash benchmarks/fashion_mnist_gram.sh START_CHECKPOINT [budget_minutes] [output_dir]
# START_CHECKPOINT: a dino-train run of benchmarks/fashion_mnist_dinov2.sh's ViT (e.g. its v1 run).
set -euo pipefail
cd "$(dirname "$0")/.."
START="$1"
BUDGET="${2:-10}"
OUT="${3:-runs/fashion_mnist_gram}"
STEPS="${STEPS:-2000}"
COMMON=(--dataset fashion_mnist --arch dinov2_vit_small --patch_size 4 --vit_depth 4 --vit_embed_dim 96
        --drop_path_rate 0 --out_dim 4096 --hidden_dim 512 --bottleneck_dim 128 --use_bn_in_head true
        --batch_size_per_gpu 64 --local_crops_number 4 --local_crops_scale 0.1 0.4
        --lr 0.001 --warmup_steps 100 --momentum_teacher 0.996 --freeze_last_layer 0
        --precision fp32 --max_steps "$STEPS" --time_budget_min "$BUDGET" --pretrained_weights "$START"
        --knn_every 1000 --knn_train_subset 10000 --knn_test_subset 2000
        --num_workers 0 --log_every 50 --no_progress --attention_maps 0)
export OMP_NUM_THREADS=1
.venv/bin/python -m dino_pytorch.train "${COMMON[@]}" --gram_weight 1 --gram_start_step 0 --gram_teacher_scale 2 \
    --output_dir "$OUT/gram" > "$OUT.gram.log" 2>&1 &
.venv/bin/python -m dino_pytorch.train "${COMMON[@]}" --output_dir "$OUT/plain" > "$OUT.plain.log" 2>&1 &
wait
unset OMP_NUM_THREADS
for run in gram plain; do
    .venv/bin/python benchmarks/patch_token_knn.py "$OUT/$run/checkpoint.pth"
    .venv/bin/python benchmarks/gram_drift.py "$START" "$OUT/$run/checkpoint.pth"
done
