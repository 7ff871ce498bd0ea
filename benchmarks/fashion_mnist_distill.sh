#!/usr/bin/env bash
# Issue 19's distillation measure: a ViT student of under half the teacher's parameters (4 blocks of
# width 60, 180k parameters, against the teacher's 4 of 96, 454k), trained for the same wall time (a)
# by distillation from the frozen teacher (--distill_from) and (b) by plain DINO; both at once, one
# thread each (the same machine conditions for both), then the 20-NN of the CLS and mean patch tokens.
#   bash benchmarks/fashion_mnist_distill.sh TEACHER_CHECKPOINT [budget_minutes] [output_dir]
# TEACHER_CHECKPOINT: a finished dino-train ViT run, e.g. benchmarks/fashion_mnist_vit.sh's (4 blocks of
# width 96). Each run plans STEPS_DISTILLED / STEPS_PLAIN steps (default STEPS, 4000) and stops at the
# budget if it comes first; a distilled step costs ~1.09x a plain one here (the frozen teacher's
# forward), so STEPS_DISTILLED=2000 STEPS_PLAIN=2180 lets both schedules finish in 20 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER="$1"
BUDGET="${2:-20}"
OUT="${3:-runs/fashion_mnist_distill}"
STEPS="${STEPS:-4000}"
STEPS_DISTILLED="${STEPS_DISTILLED:-$STEPS}"
STEPS_PLAIN="${STEPS_PLAIN:-$STEPS}"
COMMON=(--dataset fashion_mnist --arch dinov2_vit_small --patch_size 4 --vit_depth 4 --vit_embed_dim 60
        --drop_path_rate 0 --hidden_dim 512 --bottleneck_dim 128 --use_bn_in_head true
        --batch_size_per_gpu 64 --local_crops_number 4 --local_crops_scale 0.1 0.4
        --lr 0.004 --warmup_steps 300 --momentum_teacher 0.99 --freeze_last_layer 0
        --precision fp32 --time_budget_min "$BUDGET"
        --knn_every 1000 --knn_train_subset 10000 --knn_test_subset 2000
        --num_workers 0 --log_every 50 --no_progress --attention_maps 0)
export OMP_NUM_THREADS=1
.venv/bin/python -m dino_pytorch.train "${COMMON[@]}" --max_steps "$STEPS_DISTILLED" --distill_from "$TEACHER" --output_dir "$OUT/distilled" \
    > "$OUT.distilled.log" 2>&1 &
.venv/bin/python -m dino_pytorch.train "${COMMON[@]}" --max_steps "$STEPS_PLAIN" --out_dim 4096 --output_dir "$OUT/plain" \
    > "$OUT.plain.log" 2>&1 &
wait
unset OMP_NUM_THREADS
# The students' CLS and mean-patch 20-NN (the teacher's CLS 20-NN is in its own run's summary.json;
# patch_token_knn.py reads DINOv2-class ViTs, which a vit_tiny teacher is not).
for ckpt in "$OUT/distilled/checkpoint.pth" "$OUT/plain/checkpoint.pth"; do
    .venv/bin/python benchmarks/patch_token_knn.py "$ckpt"
done
