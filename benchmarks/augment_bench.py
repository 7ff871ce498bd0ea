"""Multi-crop augmentation throughput: per-image (PIL and uint8 tensors) vs batched (CPU and CUDA).

Rows, all producing the same list of batched views ``[(B, C, h, w)] * (G + N)``:

  (a) MultiCropTransform on PIL images, one image at a time, then the default collate (official-style)
  (b) MultiCropTransform on uint8 tensors, one image at a time, then the default collate
  (c) BatchedMultiCrop on a uint8 CPU batch
  (d) BatchedMultiCrop on CUDA, including the host-to-device copy of the uint8 batch (if available)
  (e) BatchedMultiCrop on a uint8 CPU batch with one seed per image (``seeds=``, what dino-train does:
      each image's parameters from its own seeded generator)

Each row is the median of ``--repeats`` timed runs after ``--warmup`` runs, single-threaded
(``torch.set_num_threads(1)``, as in a DataLoader worker) and with torch's default thread count.

    python benchmarks/augment_bench.py                     # 256x256 sources, 2x224 + 8x96 views
    python benchmarks/augment_bench.py --small             # 28x28 grey (Fashion-MNIST), 2x28 + 4x16
    python benchmarks/augment_bench.py --batch 16 --repeats 5 --image-size 64 --global-size 32 --local-size 16
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch
from torch.utils.data import default_collate
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, os.path.dirname(__file__))
# The repository root, so the script runs from a checkout without installing the package.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import machine, median_time, table  # noqa: E402
from dino_pytorch.augment import BatchedMultiCrop, MultiCropTransform  # noqa: E402
from dino_pytorch.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="28x28 grey sources, 2x28 + 4x16 views (Fashion-MNIST)")
    p.add_argument("--image-size", type=int, default=None, help="source side (default 256, --small 28)")
    p.add_argument("--global-size", type=int, default=None, help="global view side (default 224, --small 28)")
    p.add_argument("--local-size", type=int, default=None, help="local view side (default 96, --small 16)")
    p.add_argument("--locals", type=int, default=None, help="local views per image (default 8, --small 4)")
    p.add_argument("--batch", type=int, default=64, help="images per batch")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--rows", default="abcde", help="which rows to run, e.g. 'ad' (default: all; d needs CUDA)")
    args = p.parse_args()
    small = dict(image_size=28, global_size=28, local_size=16, locals=4)
    full = dict(image_size=256, global_size=224, local_size=96, locals=8)
    for name, value in (small if args.small else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1 or args.batch < 1:
        p.error("--repeats and --batch must be >= 1")
    return args


def make_transform(args: argparse.Namespace) -> MultiCropTransform:
    stats = dict(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, local_crops_scale=(0.1, 0.4)) if args.small else {}
    return MultiCropTransform(
        local_crops_number=args.locals, global_crop_size=args.global_size, local_crop_size=args.local_size, **stats
    )


def main() -> None:
    args = parse_args()
    channels = 1 if args.small else 3
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, channels, args.image_size, args.image_size)
    batch = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    pil_images = [TF.to_pil_image(image) for image in batch]
    tensor_images = list(batch)

    transform = make_transform(args)
    batched = BatchedMultiCrop.from_transform(transform)
    seeds = torch.arange(args.batch) + 1_000_003  # any per-image keys; a fresh tensor is converted per call

    def per_image(images: list) -> Callable[[], object]:
        return lambda: default_collate([transform(image) for image in images])

    default_threads = torch.get_num_threads()
    rows: list[tuple[str, int, str, float]] = []  # (pipeline, threads, device, seconds per batch)
    cpu_rows = [
        ("a", "(a) MultiCropTransform, PIL, per image", per_image(pil_images)),
        ("b", "(b) MultiCropTransform, uint8 tensor, per image", per_image(tensor_images)),
        ("c", "(c) BatchedMultiCrop, CPU batch", lambda: batched(batch)),
        ("e", "(e) BatchedMultiCrop, CPU batch, seeds= (per image)", lambda: batched(batch, seeds=seeds)),
    ]
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for key, name, fn in cpu_rows:
            if key in args.rows:
                rows.append((name, threads, "cpu", median_time(fn, args.repeats, args.warmup, "cpu")))
    torch.set_num_threads(default_threads)
    if "d" in args.rows and torch.cuda.is_available():
        pinned = batch.pin_memory()
        run = lambda: batched(pinned.to("cuda", non_blocking=True))  # noqa: E731
        seconds = median_time(run, args.repeats, args.warmup, "cuda")
        rows.append(("(d) BatchedMultiCrop, CUDA (incl. H2D copy)", default_threads, "cuda", seconds))

    baseline = {threads: t for name, threads, _, t in rows if name.startswith("(a)")}
    table_rows = []
    for name, threads, device, seconds in rows:
        reference = baseline.get(threads, baseline.get(default_threads))
        ratio = f"{reference / seconds:.2f}x" if reference else "n/a"
        throughput = f"{args.batch / seconds:,.0f}"
        table_rows.append((name, threads, device, throughput, f"{seconds * 1e3:.1f}", ratio))

    views = f"{transform.global_crops_number}x{args.global_size} + {args.locals}x{args.local_size}"
    print(
        f"Multi-crop augmentation, {args.batch} images of {channels}x{args.image_size}x{args.image_size} "
        f"-> {views} views; "
        f"median of {args.repeats} after {args.warmup} warm-up; {machine()}"
    )
    print("The last column is the speed relative to (a) with the same thread count (CUDA: vs (a) default threads).\n")
    print(table(["pipeline", "threads", "device", "images/s", "ms / batch", "vs (a)"], table_rows))


if __name__ == "__main__":
    main()
