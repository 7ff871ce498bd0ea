#!/usr/bin/env bash
# Issue 18's comparison: the same small ViT (DINOv2's class, no registers, no layer-scale), the same
# wall-time budget, DINO v1 alone vs DINOv2's recipe (v1 + iBOT + KoLeo, Sinkhorn-Knopp), one after
# the other on 2 CPU cores; then the 20-NN of the CLS token and of the mean patch token for both.
#   bash benchmarks/fashion_mnist_dinov2.sh [budget_minutes] [output_dir]   (needs `make venv data`)
# Each run plans V1_STEPS / V2_STEPS steps (default 4000 both) and stops at the budget if it comes
# first. Equal wall time by steps: DINOv2's step costs ~1.22x v1's here, so V1_STEPS=4500
# V2_STEPS=3690 gives both the same time on an idle machine and lets both schedules finish, whatever
# else shares the cores. RUNS="dinov2" (or "v1") trains only that run and evaluates both that exist.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET="${1:-21}"
OUT="${2:-runs/fashion_mnist_dinov2}"
V1_STEPS="${V1_STEPS:-4000}"
V2_STEPS="${V2_STEPS:-$V1_STEPS}"
RUNS="${RUNS:-v1 dinov2}"
COMMON=(--dataset fashion_mnist --arch dinov2_vit_small --patch_size 4 --vit_depth 4 --vit_embed_dim 96
        --drop_path_rate 0 --out_dim 4096 --hidden_dim 512 --bottleneck_dim 128 --use_bn_in_head true
        --batch_size_per_gpu 64 --local_crops_number 4 --local_crops_scale 0.1 0.4
        --lr 0.004 --warmup_steps 300 --momentum_teacher 0.99 --freeze_last_layer 0
        --precision fp32 --time_budget_min "$BUDGET"
        --knn_every 1000 --knn_train_subset 10000 --knn_test_subset 2000
        --num_workers 1 --log_every 50 --no_progress --attention_maps 0)
if [[ " $RUNS " == *" v1 "* ]]; then
    .venv/bin/python -m dino_pytorch.train "${COMMON[@]}" --max_steps "$V1_STEPS" --output_dir "$OUT/v1"
fi
if [[ " $RUNS " == *" dinov2 "* ]]; then
    .venv/bin/python -m dino_pytorch.train "${COMMON[@]}" --max_steps "$V2_STEPS" --ibot_weight 1 \
        --koleo_weight 0.1 --centering sinkhorn_knopp --output_dir "$OUT/dinov2"
fi
for run in v1 dinov2; do
    if [[ -f "$OUT/$run/checkpoint.pth" ]]; then
        .venv/bin/python benchmarks/patch_token_knn.py "$OUT/$run/checkpoint.pth"
    fi
done
