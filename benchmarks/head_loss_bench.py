"""Last layer + DINO loss, forward + backward: unfused (logits materialised) vs fused and chunked.

    python benchmarks/head_loss_bench.py                       # B=64, 2+8 views, K=65536, D=256, CPU
    python benchmarks/head_loss_bench.py --batch 4 --k 2048 --repeats 2    # smoke test

Peak memory: the most bytes of tensors alive at once while the step runs, tracked by a
TorchDispatchMode that records every storage an op creates and when it dies (a weak reference per
storage, checked after each op). Not counted, as the issue asks: the inputs (features, teacher
probabilities), the parameters and the parameters' gradients (the storages that end up as ``.grad``).
Every path is measured the same way, on a steady step (after a first one), with the parameters'
gradients reset to None. The fused path is what ``DINO(..., fused_head_loss=True)`` runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import interleaved_median, machine, table  # noqa: E402
from dino_pytorch import DINOHead  # noqa: E402
from dino_pytorch.ops import fused_last_layer_cross_entropy, multiview_cross_entropy  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Records (bytes, first op, last op alive) for every storage created by an op while active."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.live: dict[int, tuple[StorageWeakRef, int, int]] = {}  # key -> (ref, bytes, born)
        self.events: list[tuple[int, int, int, int]] = []  # (cdata, bytes, born, died)
        self.known: set[int] = set()

    def _sweep(self) -> None:
        for key, (ref, nbytes, born) in list(self.live.items()):
            if ref.expired():
                self.events.append((key, nbytes, born, self.step))
                del self.live[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.step += 1
        self._sweep()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live and ref.cdata not in self.known:
                    self.live[ref.cdata] = (ref, t.untyped_storage().nbytes(), self.step)
        return out

    def peak(self, exclude: set[int]) -> int:
        """Peak of the summed live bytes over op steps, storages in ``exclude`` (cdata) left out."""
        self._sweep()
        events = self.events + [(k, b, born, self.step + 1) for k, (_, b, born) in self.live.items()]
        deltas: dict[int, int] = {}
        for key, nbytes, born, died in events:
            if key in exclude:
                continue
            deltas[born] = deltas.get(born, 0) + nbytes
            deltas[died] = deltas.get(died, 0) - nbytes
        peak = current = 0
        for step in sorted(deltas):
            current += deltas[step]
            peak = max(peak, current)
        return peak


def peak_bytes(step: Callable[[], None], params: list[torch.nn.Parameter], inputs: list[torch.Tensor]) -> int:
    for p in params:
        p.grad = None
    mode = LiveBytes()
    mode.known = {StorageWeakRef(t.untyped_storage()).cdata for t in inputs + params}
    with mode:
        step()
    grads = {StorageWeakRef(p.grad.untyped_storage()).cdata for p in params if p.grad is not None}
    feats = [t for t in inputs if t.grad is not None]
    grads |= {StorageWeakRef(t.grad.untyped_storage()).cdata for t in feats}  # the input's gradient
    return mode.peak(grads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--global-views", dest="teacher_views", type=int, default=2)
    p.add_argument("--local-views", type=int, default=8)
    p.add_argument("--k", type=int, default=65536)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--norm-last-layer", type=int, default=1, help="1: g frozen (official default); 0: g trained")
    args = p.parse_args()
    views, batch, k = args.teacher_views + args.local_views, args.batch, args.k
    torch.manual_seed(0)
    head = DINOHead(32, k, hidden_dim=64, bottleneck_dim=args.dim, norm_last_layer=bool(args.norm_last_layer))
    v, g = head.last_layer_weights()
    params = [t for t in (g, v) if t.requires_grad]
    x = torch.nn.functional.normalize(torch.randn(views * batch, args.dim), dim=-1).requires_grad_(True)
    probs = torch.softmax(torch.randn(args.teacher_views, batch, k).mul_(0.3).clamp_(-1, 1) / 0.04, dim=-1)
    tau = 0.1

    def unfused() -> None:
        x.grad = None
        multiview_cross_entropy(head.last_layer(x), probs, tau).backward()

    def fused() -> None:
        x.grad = None
        fused_last_layer_cross_entropy(x, v, g, probs, tau, views).backward()

    paths = {"unfused": unfused, "fused": fused}
    peaks = {}
    for name, fn in paths.items():
        fn()  # a steady step
        peaks[name] = peak_bytes(fn, params, [x, probs])
    times = interleaved_median(paths, args.repeats, warmup=1)
    logits = views * batch * k * 4
    print(f"## Last layer + DINO loss fwd+bwd: B={batch}, {args.teacher_views}+{args.local_views} views, K={k}, "
          f"D={args.dim}, norm_last_layer={bool(args.norm_last_layer)}, float32; {machine()}; "
          f"median of {args.repeats}\n")
    print(f"(V*B, K) float32 logits: {logits / 2**20:.0f} MiB; weight (K, D): {k * args.dim * 4 / 2**20:.0f} MiB\n")
    labels = {
        "unfused": "unfused: head.last_layer + multiview_cross_entropy (DINO's default)",
        "fused": "fused: fused_last_layer_cross_entropy (chunked; DINO(fused_head_loss=True))",
    }
    rows = []
    for name in paths:
        rows.append([
            labels[name], f"{peaks[name] / 2**20:.1f}", f"{peaks[name] / peaks['unfused']:.3f}x",
            f"{peaks[name] / logits:.3f}x", f"{times[name] * 1e3:.1f}", f"{times[name] / times['unfused']:.2f}x",
        ])
    headers = ["path", "peak live MiB (excl. inputs, params, grads)", "vs unfused", "vs the logits' bytes",
               "fwd+bwd ms", "time vs unfused"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
