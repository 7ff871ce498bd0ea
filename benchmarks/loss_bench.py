"""DINO loss, forward + backward: ours vs an official-style per-pair loop and lightly-style einsum.

Every row computes the same thing from raw logits, timed together: the centred teacher softmax, the
multi-view cross-entropy and its backward to the student logits (no centre update).

    python benchmarks/loss_bench.py                                  # CPU, B=32, 2+8 views, K=65536
    python benchmarks/loss_bench.py --device cuda --dtype bfloat16   # adds the Triton row and GB/s
    python benchmarks/loss_bench.py --batch 4 --k 1024 --repeats 2   # smoke test

Columns: median wall time of forward+backward (>= 5 repeats after warm-up by default), bytes autograd
saves for backward (saved-tensor hooks; distinct storages, the student logits excluded since the
head's backward keeps them alive anyway), and the extra peak memory of a steady step (after a
warm-up step): on CPU the growth of peak RSS over the RSS before the
step (each row in its own process; Linux ``clear_refs`` resets the peak), on CUDA
``max_memory_allocated`` above what was allocated before. Ratios are to the official-style row.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout, not installed
from common import median_time, peak_rss_mb, reset_peak_rss, rss_mb, saved_tensor_bytes, sync, table  # noqa: E402
from dino_pytorch.ops import cross_entropy, multiview_cross_entropy_reference  # noqa: E402
from dino_pytorch.ops.engine import eager_engine, triton_engine, triton_importable  # noqa: E402

FLOOR_READ, FLOOR_RW = "floor: one read pass of the logits", "floor: one read + write pass of the logits"
LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (student (V*B, K), teacher logits (T*B, K), centre)


# -- the implementations compared --------------------------------------------------------------
def official_loop(args: argparse.Namespace) -> LossFn:
    """The official DINOLoss.forward pattern: log_softmax recomputed for every (teacher, student) pair."""

    def fn(student: Tensor, teacher: Tensor, center: Tensor) -> Tensor:
        views = (student / args.student_temp).chunk(args.views)
        probs = F.softmax((teacher - center) / args.teacher_temp, dim=-1).detach().chunk(args.teacher_views)
        total, pairs = 0, 0
        for iq, q in enumerate(probs):
            for v in range(len(views)):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(views[v], dim=-1), dim=-1).mean()
                pairs += 1
        return total / pairs

    return fn


def lightly_style_einsum(args: argparse.Namespace) -> LossFn:
    """Written here from the description in peers.md (d), not lightly's code: one stacked
    log_softmax, an einsum over (teacher view, student view) and the same-view diagonal masked."""

    def fn(student: Tensor, teacher: Tensor, center: Tensor) -> Tensor:
        t, b = args.teacher_views, args.batch
        probs = F.softmax((teacher - center) / args.teacher_temp, dim=-1).detach().view(t, b, -1)
        log_p = F.log_softmax(torch.stack(student.chunk(args.views)) / args.student_temp, dim=-1)
        cross = -torch.einsum("tbk,sbk->ts", probs, log_p)  # each cell sums over B and K
        mask = torch.ones_like(cross)
        mask[torch.arange(t), torch.arange(t)] = 0
        return (cross * mask).sum() / (mask.sum() * b)

    return fn


def lightly_installed(args: argparse.Namespace) -> LossFn:
    from lightly.loss import DINOLoss  # optional dependency

    loss = DINOLoss(output_dim=args.k, warmup_teacher_temp=args.teacher_temp, teacher_temp=args.teacher_temp,
                    warmup_teacher_temp_epochs=0, student_temp=args.student_temp)

    def fn(student: Tensor, teacher: Tensor, center: Tensor) -> Tensor:
        # lightly centres with its own (zero-initialised) centre and updates it: a small extra cost.
        return loss.to(student.device)(list(teacher.chunk(args.teacher_views)), list(student.chunk(args.views)))

    return fn


def reference(args: argparse.Namespace) -> LossFn:
    def fn(student: Tensor, teacher: Tensor, center: Tensor) -> Tensor:
        probs = eager_engine().centered_softmax(teacher, center, args.teacher_temp).chunk(args.teacher_views)
        return multiview_cross_entropy_reference(list(student.chunk(args.views)), list(probs), args.student_temp)

    return fn


def ours(engine_name: str) -> Callable[[argparse.Namespace], LossFn]:
    """What DINOLoss runs (the centred softmax, then the cross-entropy) on one named engine."""

    def build(args: argparse.Namespace) -> LossFn:
        engine = eager_engine() if engine_name == "eager" else triton_engine()
        coef = 1.0 / (args.batch * args.teacher_views * (args.views - 1))

        def fn(student: Tensor, teacher: Tensor, center: Tensor) -> Tensor:
            probs = engine.centered_softmax(teacher, center, args.teacher_temp)
            return cross_entropy(student, probs.view(args.teacher_views, args.batch, -1), args.student_temp, coef,
                                 engine=engine)

        return fn

    return build


ROWS: dict[str, Callable[[argparse.Namespace], LossFn]] = {
    "official-style per-pair loop (baseline)": official_loop,
    "lightly-style einsum (written here from peers.md)": lightly_style_einsum,
    "lightly DINOLoss (installed)": lightly_installed,
    "dino_pytorch per-view reference": reference,
    "dino_pytorch, eager engine (CPU default)": ours("eager"),
    "dino_pytorch, Triton engine (CUDA default)": ours("triton"),
}


# -- measurement -------------------------------------------------------------------------------
def inputs(args: argparse.Namespace, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, args.dtype)
    # Cosine-like logits (norm_last_layer=True gives values in [-1, 1]).
    student = torch.randn(args.views * args.batch, args.k, generator=g).mul_(0.3).clamp_(-1, 1)
    teacher = torch.randn(args.teacher_views * args.batch, args.k, generator=g).mul_(0.3).clamp_(-1, 1)
    center = torch.zeros(1, args.k)
    return (student.to(device, dtype).requires_grad_(True), teacher.to(device, dtype), center.to(device))


def measure(name: str, args: argparse.Namespace) -> dict[str, object]:
    device = torch.device(args.device)
    fn = ROWS[name](args)
    student, teacher, center = inputs(args, device)

    # Half precision as in training: logits from an autocast head, the loss under autocast too
    # (so the official loop's log_softmax runs in float32 and the einsum in half precision).
    amp = torch.autocast(device.type, dtype=student.dtype, enabled=student.dtype != torch.float32)

    def run() -> Tensor:
        with amp:
            return fn(student, teacher, center)

    def step() -> None:  # on the CPU only its memory is used: the times come from interleaved_times
        student.grad = None
        run().backward()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        # A steady step: the first one (allocator warm-up) is not counted.
        step()
        student.grad = None
        reset_peak_rss()
        base = rss_mb()
        step()
        peak = (peak_rss_mb() - base) * 2**20
    ms = 1e3 * median_time(step, args.repeats, args.warmup, device)
    student.grad = None
    # The logits are left out (the head's backward keeps them anyway): the row's own, if it has them.
    logits = fn.own["logits"] if hasattr(fn, "own") else student  # type: ignore[attr-defined]
    return {"ms": ms, "saved": saved_tensor_bytes(run, exclude=logits), "peak": peak}


def interleaved_times(names: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Median forward+backward ms of each row, all in this process, rows alternating per repeat."""
    device = torch.device(args.device)
    student, teacher, center = inputs(args, device)
    fns = {name: ROWS[name](args) for name in names}
    # The floors, over the very logits: one read pass, and one read + write pass (preallocated).
    out = torch.empty_like(student.detach())
    floors = {
        FLOOR_READ: lambda: student.detach().sum(dim=-1),
        FLOOR_RW: lambda: torch.mul(student.detach(), 0.5, out=out),
    }

    def step(name: str) -> float:
        student.grad = None
        start = time.perf_counter()
        if name in floors:
            floors[name]()
        else:
            fns[name](student, teacher, center).backward()
        return time.perf_counter() - start

    names = names + list(floors)

    for name in names:
        for _ in range(args.warmup):
            step(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            times[name].append(step(name))
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def row_in_subprocess(name: str, argv: list[str]) -> Optional[dict[str, object]]:
    """CPU rows run in their own process: peak RSS is a high-water mark that never goes down."""
    out = subprocess.run([sys.executable, __file__, *argv, "--row", name], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  {name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- Triton bandwidth --------------------------------------------------------------------------
def cuda_time_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(max(repeats, 10)):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def triton_bandwidth(args: argparse.Namespace) -> list[list[object]]:
    """Achieved GB/s of each kernel (ideal bytes: every input read once, every output written once)
    next to a device-to-device copy moving the same number of bytes (half read, half written)."""
    from dino_pytorch.ops import triton_kernels as tk

    device = torch.device("cuda")
    student, teacher, center = inputs(args, device)
    student = student.detach()
    probs = tk.centered_softmax(teacher, center, args.teacher_temp).view(args.teacher_views, args.batch, -1)
    _, stats = tk.cross_entropy_forward(student, probs, args.student_temp)
    scale = torch.ones((), device=device)
    s_bytes, t_bytes, p_bytes = student.nbytes, teacher.nbytes, probs.nbytes
    kernels = [
        ("centred teacher softmax", lambda: tk.centered_softmax(teacher, center, args.teacher_temp), t_bytes + p_bytes),
        ("cross-entropy forward (row stats)",
         lambda: tk.cross_entropy_forward(student, probs, args.student_temp), s_bytes + p_bytes),
        ("cross-entropy backward (grad)",
         lambda: tk.cross_entropy_backward(scale, student, probs, stats, args.student_temp),
         2 * s_bytes + p_bytes),
        ("centre column sum", lambda: tk.column_sum(teacher), t_bytes),
    ]
    rows = []
    for name, fn, moved in kernels:
        ms = cuda_time_ms(fn, args.repeats)
        src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_ms = cuda_time_ms(lambda dst=dst, src=src: dst.copy_(src), args.repeats)
        gbs, copy_gbs = moved / ms / 1e6, 2 * src.numel() / copy_ms / 1e6
        rows.append([name, f"{moved / 2**20:.1f}", f"{ms * 1e3:.1f}", f"{gbs:.0f}", f"{copy_gbs:.0f}",
                     f"{gbs / copy_gbs:.2f}"])
    return rows


# -- main --------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--global-views", dest="teacher_views", type=int, default=2)
    p.add_argument("--local-views", type=int, default=8)
    p.add_argument("--k", type=int, default=65536)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--student-temp", dest="student_temp", type=float, default=0.1)
    p.add_argument("--teacher-temp", dest="teacher_temp", type=float, default=0.04)
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row, print JSON
    args = p.parse_args()
    args.views = args.teacher_views + args.local_views
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.row:
        print(json.dumps(measure(args.row, args)))
        return

    notes = []
    names = list(ROWS)
    try:
        import lightly  # noqa: F401
    except ImportError:
        names.remove("lightly DINOLoss (installed)")
        notes.append("lightly is not installed: its row is skipped (the lightly-style einsum row stands in).")
    if device.type != "cuda" or not triton_importable():
        names.remove("dino_pytorch, Triton engine (CUDA default)")
        notes.append("Triton row: CUDA only.")
    argv = sys.argv[1:]
    results = {}
    for name in names:
        results[name] = measure(name, args) if device.type == "cuda" else row_in_subprocess(name, argv)
    if device.type != "cuda":
        # Times from one process, rows interleaved repeat by repeat: on a shared CPU, rows timed in
        # separate processes minutes apart differed by up to 3x from drift alone.
        for name, ms in interleaved_times(names, args).items():
            if name in (FLOOR_READ, FLOOR_RW):
                results[name] = {"ms": ms, "saved": 0, "peak": 0}
            elif results[name] is not None:
                results[name]["ms"] = ms
        notes.append("CPU times: one process, rows interleaved per repeat; peak RSS: one process per row.")
    base = results[names[0]]
    mb = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    floor_names = [n for n in (FLOOR_READ, FLOOR_RW) if n in results]
    lightly = results.get("lightly-style einsum (written here from peers.md)")
    rows = []
    for name in names + floor_names:
        r = results[name]
        if r is None:
            rows.append([name, "failed"] + [""] * 8)
            continue
        vs_floor = [f"{r['ms'] / results[f]['ms']:.2f}x" for f in floor_names] or ["", ""]
        rows.append([
            name, f"{r['ms']:.2f}", f"{base['ms'] / r['ms']:.2f}x",
            f"{lightly['ms'] / r['ms']:.2f}x" if lightly else "", *vs_floor,
            mb(r["saved"]), f"{r['saved'] / max(base['saved'], 1):.3g}x", mb(r["peak"]),
        ])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"## DINO loss forward+backward: B={args.batch}, {args.teacher_views}+{args.local_views} views, "
          f"K={args.k}, {args.dtype}, {where}, torch {torch.__version__}, median of {args.repeats}\n")
    peak_name = "CUDA peak extra (MiB)" if device.type == "cuda" else "peak RSS growth (MiB)"
    print(table(["implementation", "fwd+bwd ms", "speed-up vs official", "speed-up vs lightly-style",
                 "time / read pass", "time / read+write pass", "saved for bwd (MiB)", "saved vs baseline",
                 peak_name], rows))
    if device.type == "cuda" and "dino_pytorch, Triton engine (CUDA default)" in names:
        print("\n### Triton kernels: achieved bandwidth vs a device-to-device copy of the same bytes\n")
        headers = ["kernel", "bytes (MiB)", "time (us)", "GB/s", "copy GB/s", "fraction of copy"]
        print(table(headers, triton_bandwidth(args)))
    for note in notes:
        print(f"\n- {note}", end="")
    print()


if __name__ == "__main__":
    main()
