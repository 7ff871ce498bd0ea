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
from common import machine, median_time, table  # noqa: E402

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
    results = [
        ("official per-parameter loop", median_time(lambda: official_ema(student, plain_teacher, m), args.repeats, device=device)),
        ("lightly (_foreach_mul_ + _foreach_add_)", median_time(lambda: lightly_ema(student, plain_teacher, m), args.repeats, device=device)),
        ("ours: EMATeacher.update (foreach lerp)", median_time(lambda: ema.update(momentum=m), args.repeats, device=device)),
        ("bandwidth wall: one lerp, flat buffer", median_time(lambda: flat_t.lerp_(flat_s, 1 - m), args.repeats, device=device)),
    ]
    wall = results[-1][1]
    official = results[0][1]
    rows = [(name, f"{t * 1e3:.2f}", f"{t / wall:.2f}x", f"{official / t:.2f}x") for name, t in results]
    print(f"EMA over {n / 1e6:.2f}M parameters ({4 * n / 1e6:.0f} MB fp32), ViT-S/16 + head K={args.out_dim}; {machine()}")
    print(table(["implementation", "ms (median)", "time / flat-buffer lerp", "speed-up vs official"], rows))


if __name__ == "__main__":
    main()
