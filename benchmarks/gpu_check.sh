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

step "3. FSDP2's CUDA precision policy (dino-train --fsdp --precision bf16): bf16 gathered weights, fp32 shards, grads, reduction"
# One rank (nccl) is enough to see the policy; tests/test_fsdp.py checks the sharding itself on CPU ranks.
MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 timeout 120 python - <<'PY' 2>&1 | tee "$OUT/fsdp_precision.txt" || status=1
import os, warnings
import torch, torch.distributed as dist
from dino_pytorch import DINO
from dino_pytorch.models import vit_small
device = torch.device(os.environ.get("FSDP_CHECK_DEVICE", "cuda"))
dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
def build():
    torch.manual_seed(0)
    return DINO(vit_small(patch_size=16), out_dim=4096, input_size=(3, 64, 64)).to(device)
g = torch.Generator().manual_seed(1)
views = [torch.randn(8, 3, 64, 64, generator=g).to(device) for _ in range(2)]
reference = build()
ref_loss = reference(views).item()
dino = build()
dino.distribute(strategy="fsdp", param_dtype=torch.bfloat16)  # what dino-train --fsdp passes on CUDA
seen = []
block = dino.student.backbone.blocks[0]
block.register_forward_pre_hook(lambda m, a: seen.append(m.attn.qkv.weight.dtype))
loss = dino(views)
loss.backward()
policy = dino.student._get_fsdp_state()._mp_policy  # private, but the one place the policy is kept
shards = {p.to_local().dtype for p in dino.student.parameters()}
grads = {p.grad.to_local().dtype for p in dino.student.parameters() if p.grad is not None}
teacher = {p.to_local().dtype for p in dino.teacher.parameters()}
dino.update_teacher()
checks = {
    "policy param_dtype bf16": policy.param_dtype == torch.bfloat16,
    "policy reduce_dtype fp32": policy.reduce_dtype == torch.float32,
    "weights gathered for the forward in bf16": seen == [torch.bfloat16],
    "sharded weights fp32": shards == {torch.float32},
    "gradients (reduced) fp32": grads == {torch.float32},
    "teacher shards fp32 (the EMA)": teacher == {torch.float32},
    f"loss {loss.item():.4f} vs fp32 {ref_loss:.4f} within 2%": abs(loss.item() - ref_loss) <= 0.02 * abs(ref_loss),
}
for name, ok in checks.items():
    print(("ok    " if ok else "FAIL  ") + name)
dist.destroy_process_group()
raise SystemExit(0 if all(checks.values()) else 1)
PY

step "summary"
tail -2 "$OUT/correctness.txt"
for f in loss_fp32 loss_bf16 ema augment step; do echo "-- $f"; grep '^|' "$OUT/$f.md" | tail -n +3; done
echo "-- fsdp_precision"; grep -E '^(ok|FAIL)' "$OUT/fsdp_precision.txt"
exit $status
