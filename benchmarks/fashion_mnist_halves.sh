#!/usr/bin/env bash
# Issue 20's experiment: continuing from weights without wrecking them, on Fashion-MNIST halves.
# A ViT is pretrained on classes 0-4 only (2000 steps, under 20 minutes of 2 cores), then continued on
# classes 5-9 only (800 steps each, under 10 minutes) (a) from its backbone with fresh
# heads and a head warm-up, (b) from its backbone with fresh heads and no warm-up, (c) with its own
# heads kept. The 20-NN top-1 within each half (bank: that half's train images, queries: its test
# images) is measured for the start model and the three continued ones.
#   bash benchmarks/fashion_mnist_halves.sh [output_dir] [stage]    (needs `make venv data`)
#   stage: all (default) | pretrain | continue | knn
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/fashion_mnist_halves}"
STAGE="${2:-all}"
PY=.venv/bin/python
A="$OUT/data/classes_0-4"
B="$OUT/data/classes_5-9"
# The ViT recipe of benchmarks/fashion_mnist_vit.sh. The runs are fixed in steps, not in time, so
# that the three continuations compare the same work on a shared, noisy machine: 2000 pretraining
# steps are about 18 minutes of these 2 cores alone (about 110 steps a minute) and 800 continuation
# steps about 7; the time budgets (twice that) only guard against a stalled machine. The
# environment overrides the counts for a smoke run (PRETRAIN_STEPS=20 CONTINUE_STEPS=10 WARMUP_STEPS=5).
COMMON=(--dataset fashion_mnist --arch vit_tiny --patch_size 4 --vit_depth 4 --vit_embed_dim 96
        --drop_path_rate 0 --out_dim 4096 --hidden_dim 512 --bottleneck_dim 128 --use_bn_in_head true
        --batch_size_per_gpu 64 --local_crops_number 4 --local_crops_scale 0.1 0.4
        --momentum_teacher 0.99 --freeze_last_layer 0 --precision fp32 --knn_every 0
        --num_workers 1 --log_every 50 --no_progress --attention_maps 0 --no_final_knn)
PRETRAIN_STEPS="${PRETRAIN_STEPS:-2000}"
CONTINUE_STEPS="${CONTINUE_STEPS:-800}"
WARMUP_STEPS="${WARMUP_STEPS:-250}"
# The continuations' lr (per 256 images, as --lr); CONTINUE_LR=0.004 (the pretraining's) is the
# harsher test of the warm-up. SUFFIX names that second set of runs (e.g. SUFFIX=_lr0.004).
CONTINUE_LR="${CONTINUE_LR:-0.001}"
SUFFIX="${SUFFIX:-}"

if [[ "$STAGE" == all || "$STAGE" == pretrain ]]; then
    $PY benchmarks/fashion_mnist_halves.py "$OUT/data"
    FASHION_MNIST_DIR="$A" $PY -m dino_pytorch.train "${COMMON[@]}" --lr 0.004 --warmup_steps 300 \
        --max_steps "$PRETRAIN_STEPS" --time_budget_min 40 --output_dir "$OUT/start"
    # The backbone alone, as a released model is (the teacher's, as the official code releases it).
    $PY - "$OUT/start/checkpoint.pth" "$OUT/start/backbone.pth" <<'PYEOF'
import sys, torch
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
teacher = ckpt["teacher"]
backbone = {k.split("backbone.", 1)[1]: v for k, v in teacher.items() if "backbone." in k}
torch.save(backbone, sys.argv[2])
print(f"{sys.argv[2]}: {len(backbone)} backbone tensors")
PYEOF
fi

if [[ "$STAGE" == all || "$STAGE" == continue ]]; then
    CONT=("${COMMON[@]}" --lr "$CONTINUE_LR" --warmup_steps 100 --max_steps "$CONTINUE_STEPS" --time_budget_min 20)
    FASHION_MNIST_DIR="$B" $PY -m dino_pytorch.train "${CONT[@]}" --pretrained_weights "$OUT/start/backbone.pth" \
        --head_warmup_steps "$WARMUP_STEPS" --output_dir "$OUT/a_warmup$SUFFIX"
    FASHION_MNIST_DIR="$B" $PY -m dino_pytorch.train "${CONT[@]}" --pretrained_weights "$OUT/start/backbone.pth" \
        --output_dir "$OUT/b_fresh_heads$SUFFIX"
    FASHION_MNIST_DIR="$B" $PY -m dino_pytorch.train "${CONT[@]}" --pretrained_weights "$OUT/start/checkpoint.pth" \
        --output_dir "$OUT/c_own_heads$SUFFIX"
fi

if [[ "$STAGE" == all || "$STAGE" == knn ]]; then
    for run in start a_warmup$SUFFIX b_fresh_heads$SUFFIX c_own_heads$SUFFIX; do
        for half in classes_0-4 classes_5-9; do
            [[ -f "$OUT/$run/checkpoint.pth" ]] || continue
            echo "== $run on $half"
            FASHION_MNIST_DIR="$OUT/data/$half" $PY -m dino_pytorch.cli.eval_knn \
                --pretrained_weights "$OUT/$run/checkpoint.pth" --nb_knn 20 --num_workers 1 --device cpu \
                | tail -n 3
        done
    done
fi
