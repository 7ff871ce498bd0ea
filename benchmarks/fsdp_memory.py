"""Per-rank bytes of a DINO under FSDP2: parameters (student + teacher), gradients, AdamW state.

Each world size runs in its own gloo processes on the CPU (FSDP2 shards the same way on any device):
a DINO with a ViT-S/16 and the official head (K = 65 536) is sharded with
``DINO.distribute(strategy="fsdp")`` (1 process: not sharded, the DDP-like baseline), takes one
AdamW step on small random views, and every rank counts the bytes it holds from its local shards
(:func:`dino_pytorch.fsdp.local_bytes`). The largest rank is reported, and the ratio to 1 process.
Then the formula below is applied to ViT-L/14 and ViT-g/14 (parameters counted on the meta device).

    python benchmarks/fsdp_memory.py                       # 1, 2, 4 processes, ViT-S/16
    python benchmarks/fsdp_memory.py --world_sizes 1 2 --arch vit_tiny

Per rank, sharded over N ranks (P_s, P_t: student and teacher parameters, P_u: the largest unit
gathered whole at a time, a block or the head's last layer; b_w: the gathered weights' bytes, 4 in
fp32 or 2 with bf16 parameters):

    bytes(N) = (4 P_s + 4 P_t + 4 P_s + 8 P_s) / N  +  2 b_w P_u
               params   teacher grads   AdamW      the gathered unit and the next one (prefetch)

without activations, which FSDP does not shard (activation checkpointing cuts those).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, table  # noqa: E402
from dino_pytorch import DINO  # noqa: E402
from dino_pytorch.fsdp import local_bytes, shard_units  # noqa: E402
from dino_pytorch.models import dinov2_vit_large, vit_base, vit_small, vit_tiny  # noqa: E402
from dino_pytorch.models.dinov2_vit import DinoVisionTransformer  # noqa: E402

GB = 1e9
ARCHS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


def build(arch: str, out_dim: int) -> DINO:
    torch.manual_seed(0)
    return DINO(ARCHS[arch](patch_size=16), out_dim=out_dim, input_size=(3, 64, 64))


def worker(rank: int, world: int, init: str, out: str, arch: str, out_dim: int) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    dino = build(arch, out_dim)
    if world > 1:
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")  # as dino-train
        dino.distribute(strategy="fsdp")
    optimizer = torch.optim.AdamW(dino.param_groups(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    views = [torch.randn(2, 3, 64, 64, generator=g) for _ in range(2)]  # small views: bytes, not speed
    dino(views).backward()
    dino.optimizer_step(optimizer)
    dino.update_teacher()
    counted = local_bytes(dino, optimizer)
    Path(out, f"{world}-{rank}.json").write_text(json.dumps(counted))
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, arch: str, out_dim: int) -> dict[str, int]:
    """The largest rank's bytes at ``world`` processes."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(world, os.path.join(folder, "init"), folder, arch, out_dim), nprocs=world)
        ranks = [json.loads(Path(folder, f"{world}-{r}.json").read_text()) for r in range(world)]
    return max(ranks, key=lambda r: r["total"])


def counts(model: DINO) -> dict[str, int]:
    """P_s (= P_t) and P_u: the student's parameters and its largest FSDP unit's."""
    student = model.student
    units = [f"backbone.{n}" for n in shard_units(student.backbone)] + ["head.mlp", "head.last_layer"]
    largest = max(sum(p.numel() for p in student.get_submodule(u).parameters()) for u in units)
    return {"params": sum(p.numel() for p in student.parameters()), "unit": largest}


def vit_g14() -> DinoVisionTransformer:
    """DINOv2's ViT-g/14 for counting: width 1536, 40 blocks, 24 heads, layer-scale. Its SwiGLU FFN
    (hidden 4096: 3 x 1536 x 4096 weights) has the weights of an MLP of hidden 6144 (2 x 1536 x 6144),
    so the MLP block counts the same to 0.01 % (the biases)."""
    return DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=4,
                                 init_values=1e-5, block_chunks=0)


def per_rank_gb(params: int, unit: int, n: int, gathered_bytes: int) -> float:
    """The formula of the module docstring, in GB."""
    return (20 * params / n + 2 * gathered_bytes * unit) / GB


def extrapolate(out_dim: int) -> tuple[list[str], list[list[Any]]]:
    rows = []
    for name, make in (("ViT-L/14", lambda: dinov2_vit_large(init_values=1e-5)), ("ViT-g/14", vit_g14)):
        with torch.device("meta"):  # counts without allocating a byte
            c = counts(DINO(make(), out_dim=out_dim, input_size=(3, 224, 224)))
        rows.append([name, f"{c['params'] / 1e6:.0f} M", f"{20 * c['params'] / GB:.1f}",
                     *[f"{per_rank_gb(c['params'], c['unit'], n, 2):.2f}" for n in (8, 16, 32, 64)]])
    header = [f"model + head (K = {out_dim})", "P_s", "DDP: 20 P_s (GB)",
              *[f"FSDP, {n} GPUs (GB)" for n in (8, 16, 32, 64)]]
    return header, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--arch", default="vit_small", choices=["vit_tiny", "vit_small", "vit_base"])
    parser.add_argument("--out_dim", type=int, default=65536)
    parser.add_argument("--json", default=None, help="also write the measured bytes here")
    args = parser.parse_args()
    print(f"# {machine()}, gloo, {args.arch}/16 + DINO head (K = {args.out_dim}), AdamW, after one step")
    measured = {w: measure(w, args.arch, args.out_dim) for w in args.world_sizes}
    base = measured[min(measured)]
    rows = [[w, *[f"{m[k] / 1e6:.1f}" for k in ("parameters", "gradients", "optimizer", "total")],
             f"{m['total'] / base['total']:.3f}"] for w, m in measured.items()]
    print(table(["processes", "parameters (MB)", "gradients (MB)", "AdamW state (MB)", "total (MB)",
                 "total / 1 process"], rows))
    print("\nExtrapolated per GPU (formula in the module docstring; bf16 gathered weights, no activations):")
    print(table(*extrapolate(args.out_dim)))
    if args.json:
        Path(args.json).write_text(json.dumps({str(w): m for w, m in measured.items()}, indent=1))


if __name__ == "__main__":
    main()
