#!/usr/bin/env bash
# One prepared check for a GPU machine, about 6 minutes: first every CUDA path against its
# PyTorch twin (fp32, bf16), then timings, then one short table. Needs torch + triton there; the
# package runs from this checkout (PYTHONPATH), nothing is downloaded.
#
#   bash benchmarks/gpu_check.sh            # results also land in $OUT (default /tmp/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
status=0
step() { echo; echo "== $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"

step "1. correctness: the Triton engine vs the eager engine (loss/softmax/centre sum fp32+bf16+fp16, compile), batched multi-crop, k-NN"
timeout 240 python -m pytest -q -x -p no:cacheprovider tests/cuda tests/test_cross_entropy.py tests/test_loss.py \
    tests/test_loss_hazards.py tests/test_fused_head_loss.py \
    2>&1 | tee "$OUT/correctness.txt" | tail -4 || status=1

step "2a. loss forward+backward: official loop, eager engine, Triton engine (fp32 and bf16; GB/s vs a copy)"
timeout 90 python benchmarks/loss_bench.py --device cuda --batch 64 2>&1 | tee "$OUT/loss_fp32.md" || status=1
timeout 90 python benchmarks/loss_bench.py --device cuda --batch 64 --dtype bfloat16 2>&1 | tee "$OUT/loss_bf16.md" || status=1

step "2b. EMA over ViT-S/16 + head (K=65536)"
timeout 60 python benchmarks/ema_bench.py --device cuda 2>&1 | tee "$OUT/ema.md" || status=1

step "2c. batched multi-crop (official 2x224 + 8x96 from 256x256 sources)"
timeout 90 python benchmarks/augment_bench.py --batch 128 --repeats 5 2>&1 | tee "$OUT/augment.md" || status=1

step "2d. ViT-S/16 training step, bf16, B=64, 2x224 + 8x96, K=65536: official-style, ours, ours on the eager engine"
timeout 150 python benchmarks/step_bench.py --device cuda --arch vit_small --global_size 224 --local_size 96 \
    --batch 64 --precision bf16 2>&1 | tee "$OUT/step.md" || status=1

step "summary"
tail -2 "$OUT/correctness.txt"
for f in loss_fp32 loss_bf16 ema augment step; do echo "-- $f"; grep '^|' "$OUT/$f.md" | tail -n +3; done
exit $status
