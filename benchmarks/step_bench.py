"""One DINO training step: ours vs an official-style step, same model, same views.

Official-style (written from the reference): per-pair loss loop with log_softmax per pair,
`loss.item()` finiteness check every step, per-parameter clip with one `.item()` per parameter,
last-layer freeze by scanning parameter names, per-parameter EMA loop, and a final sync.
Ours: the library's DINOLoss (closed-form cross-entropy on the engine ``engine_for`` picks: Triton
on CUDA, eager on the CPU), foreach clip without syncs, cached last-layer list, foreach-lerp EMA, no
host sync. On CUDA a third row forces the eager engine (``DINO_PYTORCH_ENGINE=eager``): what the
Triton kernels buy in the whole step.

    python benchmarks/step_bench.py                       # CPU preset: ViT-tiny/16, 64 px + 32 px crops
    python benchmarks/step_bench.py --device cuda --arch vit_small --global_size 224 --local_size 96 \
        --batch 64 --precision bf16
"""
import argparse
import contextlib
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, median_time, peak_rss_mb, table  # noqa: E402
from dino_pytorch import DINOHead, DINOLoss, EMATeacher, MultiCropWrapper  # noqa: E402
from dino_pytorch.models import create_model  # noqa: E402
from dino_pytorch.ops import ENGINE_ENV  # noqa: E402
from dino_pytorch.optim import cancel_gradients_, clip_gradients_, get_params_groups  # noqa: E402


class OfficialStyleLoss(torch.nn.Module):
    """The official DINOLoss forward order, single process (no all_reduce)."""

    def __init__(self, out_dim, ncrops, teacher_temp=0.04, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.ncrops, self.teacher_temp, self.student_temp, self.m = ncrops, teacher_temp, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output, teacher_output):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        with torch.no_grad():
            batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
            self.center = self.center * self.m + batch_center * (1 - self.m)
        return total_loss


def build(args, device):
    torch.manual_seed(0)
    backbone = create_model(args.arch, patch_size=args.patch_size, img_size=args.global_size, drop_path_rate=0.1)
    student = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, args.out_dim)).to(device)
    teacher = EMATeacher(student)
    optimizer = torch.optim.AdamW(get_params_groups(student), lr=1e-4)
    return student, teacher, optimizer


def autocast(args, device):
    if args.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="vit_tiny")
    p.add_argument("--patch_size", type=int, default=16)
    p.add_argument("--global_size", type=int, default=64)
    p.add_argument("--local_size", type=int, default=32)
    p.add_argument("--local_crops", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out_dim", type=int, default=65536)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    ncrops = 2 + args.local_crops
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(args.batch, 3, args.global_size, args.global_size, generator=g) for _ in range(2)]
    views += [
        torch.randn(args.batch, 3, args.local_size, args.local_size, generator=g) for _ in range(args.local_crops)
    ]
    views = [v.to(device) for v in views]

    # --- official style ------------------------------------------------------------------------
    o_student, o_teacher, o_opt = build(args, device)
    o_teacher = o_teacher.module  # plain frozen copy; EMA by the official loop below
    o_loss = OfficialStyleLoss(args.out_dim, ncrops).to(device)

    def official_step():
        with autocast(args, device):
            t = o_teacher(views[:2])
            s = o_student(views)
            loss = o_loss(s, t)
        if not math.isfinite(loss.item()):
            raise SystemExit("non-finite")
        o_opt.zero_grad()
        loss.backward()
        for param in o_student.parameters():  # utils.clip_gradients
            if param.grad is not None:
                n = param.grad.data.norm(2)
                _ = n.item()
                coef = 3.0 / (n + 1e-6)
                if coef < 1:
                    param.grad.data.mul_(coef)
        for name, param in o_student.named_parameters():  # cancel_gradients_last_layer (epoch 0)
            if "last_layer" in name:
                param.grad = None
        o_opt.step()
        with torch.no_grad():
            m = 0.996
            for q, k in zip(o_student.parameters(), o_teacher.parameters()):
                k.data.mul_(m).add_((1 - m) * q.detach().data)
        if device.type == "cuda":
            torch.cuda.synchronize()
        _ = loss.item()

    # --- ours ----------------------------------------------------------------------------------
    student, teacher, opt = build(args, device)
    criterion = DINOLoss(args.out_dim, ncrops).to(device)
    last_layer = student.head.last_layer_parameters()
    params = [q for q in student.parameters() if q.requires_grad]

    def our_step():
        with autocast(args, device):
            loss = criterion(student(views), teacher(views[:2]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients_(params, 3.0)
        cancel_gradients_(last_layer)
        opt.step()
        teacher.update(momentum=0.996)
        return loss

    def eager_step():
        os.environ[ENGINE_ENV] = "eager"
        try:
            return our_step()
        finally:
            del os.environ[ENGINE_ENV]

    # Interleaved (official, ours, official, ...) so that drifts of a shared machine hit both alike.
    steps = {"official": official_step, "ours": our_step}
    if device.type == "cuda":
        steps["ours, eager engine"] = eager_step
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            times[name].append(median_time(fn, 1, warmup=1, device=device))
    medians = {name: statistics.median(t) for name, t in times.items()}
    t_official = medians["official"]
    if device.type == "cuda":
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB CUDA"
    else:
        mem = f"{peak_rss_mb():.0f} MB RSS"
    print(f"{args.arch}/{args.patch_size}, B={args.batch}, "
          f"2x{args.global_size}px + {args.local_crops}x{args.local_size}px, "
          f"K={args.out_dim}, {args.precision}; {machine()}; peak {mem}")
    labels = {"official": "official-style", "ours": "ours", "ours, eager engine": "ours, eager engine forced"}
    print(table(["step", "s (median)", "speed-up vs official-style"],
                [(labels[name], f"{t:.3f}", f"{t_official / t:.2f}x") for name, t in medians.items()]))


if __name__ == "__main__":
    main()
