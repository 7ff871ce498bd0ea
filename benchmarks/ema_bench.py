"""EMA teacher update: ours (foreach lerp) vs the official per-parameter loop, lightly's two
foreach calls, and the bandwidth wall (one lerp over a single flat buffer of the same bytes).

    python benchmarks/ema_bench.py                  # ViT-S/16 + DINO head (K=65536), CPU
    python benchmarks/ema_bench.py --device cuda
"""
import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved_median, machine, memory_floor, table  # noqa: E402
from dino_pytorch import DINOHead, EMATeacher, MultiCropWrapper  # noqa: E402
from dino_pytorch.models import vit_small  # noqa: E402


def official_ema(student: nn.Module, teacher: nn.Module, m: float) -> None:
    with torch.no_grad():
        for param_q, param_k in zip(student.parameters(), teacher.parameters()):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


def lightly_ema(student: nn.Module, teacher: nn.Module, m: float) -> None:
    with torch.no_grad():
        t, s = list(teacher.parameters()), list(student.parameters())
        torch._foreach_mul_(t, m)
        torch._foreach_add_(t, s, alpha=1 - m)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out_dim", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    device = torch.device(args.device)
    student = MultiCropWrapper(vit_small(patch_size=16), DINOHead(384, args.out_dim)).to(device)
    ema = EMATeacher(student)
    plain_teacher = copy.deepcopy(student).requires_grad_(False)
    n = sum(p.numel() for p in student.parameters())
    flat_t = torch.zeros(n, device=device)
    flat_s = torch.randn(n, device=device)
    m = 0.996
    rows = {
        "official per-parameter loop": lambda: official_ema(student, plain_teacher, m),
        "lightly (_foreach_mul_ + _foreach_add_)": lambda: lightly_ema(student, plain_teacher, m),
        "ours: EMATeacher.update (cached plan, one foreach lerp per dtype)": lambda: ema.update(momentum=m),
        "bandwidth wall: one lerp, flat buffer": lambda: flat_t.lerp_(flat_s, 1 - m),
    }
    # The floors move the same bytes as the EMA: it reads teacher + student (8n bytes), writes 4n.
    floor = memory_floor(4 * n, device)
    rows.update(floor)
    times = interleaved_median(rows, args.repeats, device=device)
    wall, official = times["bandwidth wall: one lerp, flat buffer"], times["official per-parameter loop"]
    read, rw = times["floor: one read pass"], times["floor: one read + write pass"]
    out = [(name, f"{t * 1e3:.2f}", f"{t / wall:.2f}x", f"{t / read:.2f}x", f"{t / rw:.2f}x", f"{official / t:.2f}x")
           for name, t in times.items()]
    print(f"EMA over {n / 1e6:.2f}M parameters ({4 * n / 1e6:.0f} MB fp32), ViT-S/16 + head K={args.out_dim}; "
          f"{machine()}; rows interleaved, median of {args.repeats}")
    print("floors: one pass over the parameters' bytes (4n); the EMA itself reads 8n and writes 4n bytes\n")
    print(table(["implementation", "ms (median)", "time / flat-buffer lerp", "time / read pass",
                 "time / read+write pass", "speed-up vs official"], out))

if __name__ == "__main__":
    main()
