"""Train DINO: the reference script, readable top to bottom.

    python -m dino_pytorch.train --dataset fashion_mnist --arch convnet --output_dir runs/fmnist
    torchrun --nproc_per_node=2 -m dino_pytorch.train ...          # DDP (gloo on CPU, nccl on CUDA)

Every official ``main_dino.py`` flag keeps its name and default; the iteration follows the official
order (per-step lr / wd / momentum, teacher on the global views, per-parameter clip, last-layer
freeze, EMA). The run resumes automatically from ``output_dir/checkpoint.pth``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from . import distributed
from .backbones import as_feature_extractor, infer_feature_dim
from .diagnostics import collapse_metrics
from .head import DINOHead
from .loss import DINOLoss
from .optim import build_optimizer, cancel_gradients_, clip_gradients_, get_params_groups, set_schedules
from .sampler import ResumableSampler
from .schedules import cosine_scheduler
from .teacher import EMATeacher
from .wrapper import MultiCropWrapper

VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base")
CRASH_ENV = "DINO_PYTORCH_CRASH_AFTER_STEP"  # tests: die right after this step's checkpoint


def bool_flag(s: str) -> bool:
    """Official boolean flag parsing: on/true/1 and off/false/0."""
    if s.lower() in {"on", "true", "1"}:
        return True
    if s.lower() in {"off", "false", "0"}:
        return False
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {s!r} (expected true/false)")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DINO", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- official flags, official defaults ---
    p.add_argument("--arch", default="vit_small", type=str,
                   help="vit_tiny / vit_small / vit_base, convnet, a torchvision ResNet name, or timm:<name>")
    p.add_argument("--patch_size", default=16, type=int)
    p.add_argument("--out_dim", default=65536, type=int)
    p.add_argument("--norm_last_layer", default=True, type=bool_flag)
    p.add_argument("--momentum_teacher", default=0.996, type=float)
    p.add_argument("--use_bn_in_head", default=False, type=bool_flag)
    p.add_argument("--warmup_teacher_temp", default=0.04, type=float)
    p.add_argument("--teacher_temp", default=0.04, type=float)
    p.add_argument("--warmup_teacher_temp_epochs", default=0, type=int)
    p.add_argument("--use_fp16", default=True, type=bool_flag,
                   help="fp16 autocast + GradScaler on CUDA (ignored on CPU unless --precision says so)")
    p.add_argument("--weight_decay", default=0.04, type=float)
    p.add_argument("--weight_decay_end", default=0.4, type=float)
    p.add_argument("--clip_grad", default=3.0, type=float)
    p.add_argument("--batch_size_per_gpu", default=64, type=int)
    p.add_argument("--epochs", default=100, type=int)
    p.add_argument("--freeze_last_layer", default=1, type=int)
    p.add_argument("--lr", default=0.0005, type=float)
    p.add_argument("--warmup_epochs", default=10, type=int)
    p.add_argument("--min_lr", default=1e-6, type=float)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "lars"])
    p.add_argument("--drop_path_rate", default=0.1, type=float)
    p.add_argument("--global_crops_scale", type=float, nargs="+", default=(0.4, 1.0))
    p.add_argument("--local_crops_number", type=int, default=8)
    p.add_argument("--local_crops_scale", type=float, nargs="+", default=(0.05, 0.4))
    p.add_argument("--data_path", default="/path/to/imagenet/train/", type=str)
    p.add_argument("--output_dir", default=".", type=str)
    p.add_argument("--saveckp_freq", default=20, type=int)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--num_workers", default=10, type=int)
    p.add_argument("--dist_url", default="env://", type=str)
    p.add_argument("--local_rank", default=0, type=int, help="ignored (torchrun sets LOCAL_RANK)")
    # --- ours ---
    p.add_argument("--dataset", default="imagefolder", choices=["imagefolder", "fashion_mnist"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                   help="default: fp16 when --use_fp16 and on CUDA, else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the student and teacher")
    p.add_argument("--channels_last", action="store_true",
                   help="NHWC conv weights and views (oneDNN's faster CPU kernels); measured on the "
                        "Fashion-MNIST ConvNet: 0.45 -> 0.37 s per step, 0.30 s with --precision bf16")
    p.add_argument("--grad_accum_steps", default=1, type=int)
    p.add_argument("--max_steps", default=None, type=int,
                   help="total optimizer steps; the schedules then span exactly these steps")
    p.add_argument("--warmup_steps", default=None, type=int, help="linear lr warm-up in steps (overrides --warmup_epochs)")
    p.add_argument("--time_budget_min", default=None, type=float, help="stop (and checkpoint) after this long")
    p.add_argument("--knn_every", default=0, type=int, help="k-NN evaluation every N steps (0: only at the end)")
    p.add_argument("--knn_train_subset", default=None, type=int, help="periodic k-NN on the first N train images")
    p.add_argument("--knn_test_subset", default=None, type=int, help="periodic k-NN on the first N test images")
    p.add_argument("--no_final_knn", action="store_true")
    p.add_argument("--log_every", default=10, type=int)
    p.add_argument("--save_every_steps", default=0, type=int, help="also checkpoint every N steps")
    p.add_argument("--augment", default=None, choices=["per_image", "batched"],
                   help="per_image: MultiCropTransform in the workers (official); batched: BatchedMultiCrop "
                        "on the device. Default: batched for fashion_mnist, per_image otherwise")
    p.add_argument("--global_crop_size", default=None, type=int, help="default 224 (28 for fashion_mnist)")
    p.add_argument("--local_crop_size", default=None, type=int, help="default 96 (16 for fashion_mnist)")
    p.add_argument("--hidden_dim", default=2048, type=int)
    p.add_argument("--bottleneck_dim", default=256, type=int)
    p.add_argument("--width", default=32, type=int, help="convnet width")
    p.add_argument("--pool", default=1, type=int, help="convnet: average-pool the last map to pool x pool cells")
    p.add_argument("--vit_depth", default=None, type=int, help="ViT: blocks (default: the arch's 12)")
    p.add_argument("--vit_embed_dim", default=None, type=int, help="ViT: width (default: the arch's)")
    p.add_argument("--attention_maps", default=4, type=int, help="ViT only: attention PNGs of N test images at the end")
    p.add_argument("--no_progress", action="store_true", help="plain log lines instead of a tqdm bar")
    return p


# ------------------------------------------------------------------------------------------------
# set-up helpers
# ------------------------------------------------------------------------------------------------
def init_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """Process group from torchrun's env vars (gloo on CPU, nccl on CUDA); none for one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = args.device is None and torch.cuda.is_available() or str(args.device).startswith("cuda")
    if args.device is None:
        device = torch.device(f"cuda:{local_rank}" if wants_cuda else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=args.dist_url,
                                rank=rank, world_size=world_size)
    return rank, world_size, device


def resolve_defaults(args: argparse.Namespace, device: torch.device) -> None:
    small = args.dataset == "fashion_mnist"
    if args.global_crop_size is None:
        args.global_crop_size = 28 if small else 224
    if args.local_crop_size is None:
        args.local_crop_size = 16 if small else 96
    if args.augment is None:
        args.augment = "batched" if small else "per_image"
    if args.precision is None:
        args.precision = "fp16" if args.use_fp16 and device.type == "cuda" else "fp32"
    for name in ("global_crops_scale", "local_crops_scale"):
        value = tuple(getattr(args, name))
        if len(value) != 2:
            raise ValueError(f"--{name} {value}: expected two numbers (min max)")
        setattr(args, name, value)
    if args.grad_accum_steps < 1:
        raise ValueError(f"--grad_accum_steps {args.grad_accum_steps}: expected >= 1")


def image_channels(args: argparse.Namespace) -> int:
    """Grey Fashion-MNIST stays 1-channel except for torchvision models, which expect RGB."""
    from .models.registry import list_models

    torchvision_arch = args.arch in list_models() and args.arch not in (*VIT_ARCHS, "convnet")
    return 1 if args.dataset == "fashion_mnist" and not torchvision_arch else 3


def build_data(args: argparse.Namespace, rank: int, world_size: int):
    """(loader, sampler, augment_on_device, mean, std) of the training set."""
    from .datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST, SeededTransform
    from .transforms import IMAGENET_MEAN, IMAGENET_STD, MultiCropTransform

    if args.dataset == "fashion_mnist":
        base = FashionMNIST(train=True)
        mean, std = FASHION_MNIST_MEAN * args.in_chans, FASHION_MNIST_STD * args.in_chans
    else:
        from torchvision.datasets import ImageFolder

        base, mean, std = ImageFolder(args.data_path), IMAGENET_MEAN, IMAGENET_STD
    crop_kwargs = dict(
        global_crops_scale=args.global_crops_scale, local_crops_scale=args.local_crops_scale,
        local_crops_number=args.local_crops_number, global_crop_size=args.global_crop_size,
        local_crop_size=args.local_crop_size, mean=mean, std=std,
    )
    augment_on_device = None
    if args.augment == "per_image":
        dataset = SeededTransform(base, MultiCropTransform(**crop_kwargs), seed=args.seed)
    else:
        from .batched_transforms import BatchedMultiCrop

        if args.dataset != "fashion_mnist":
            raise ValueError("--augment batched needs equal-size uint8 images: use it with --dataset fashion_mnist")
        dataset = SeededTransform(base, nn.Identity(), seed=args.seed)
        augment_on_device = BatchedMultiCrop(**crop_kwargs)
    sampler = ResumableSampler(len(dataset), args.batch_size_per_gpu, seed=args.seed, rank=rank, world_size=world_size)
    loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, drop_last=True,
                        num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=args.num_workers > 0)
    return loader, sampler, augment_on_device, mean, std


def build_backbone(args: argparse.Namespace) -> nn.Module:
    from .models import create_model

    if args.arch in VIT_ARCHS:
        sizes = {k: v for k, v in (("depth", args.vit_depth), ("embed_dim", args.vit_embed_dim)) if v is not None}
        return create_model(args.arch, patch_size=args.patch_size, drop_path_rate=args.drop_path_rate,
                            img_size=args.global_crop_size, in_chans=args.in_chans, **sizes)
    if args.arch == "convnet":
        return create_model("convnet", in_chans=args.in_chans, width=args.width, pool=args.pool)
    if args.arch.startswith("timm:"):
        # num_classes=0: no dead classifier parameters (DDP would wait for their gradients).
        return create_model(args.arch, in_chans=args.in_chans, num_classes=0, drop_path_rate=args.drop_path_rate)
    return create_model(args.arch)


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Stop(Exception):
    """Ends the run with a message and exit status (non-finite loss, ...)."""


# ------------------------------------------------------------------------------------------------
# evaluation during / after training
# ------------------------------------------------------------------------------------------------
def eval_datasets(args: argparse.Namespace, mean, std, train_subset=None, test_subset=None):
    """Unaugmented, normalised train / test datasets for k-NN (official eval transforms)."""
    from torch.utils.data import Subset, TensorDataset

    if args.dataset == "fashion_mnist":
        from .datasets import load_fashion_mnist

        sets = []
        for train in (True, False):
            images, labels = load_fashion_mnist(train)
            x = images.float().div_(255).repeat(1, args.in_chans, 1, 1)
            if args.global_crop_size != x.shape[-1]:
                x = torch.nn.functional.interpolate(x, size=args.global_crop_size, mode="bicubic", align_corners=False)
            x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
            sets.append(TensorDataset(x, labels))
        train_set, test_set = sets
    else:
        from torchvision import transforms as T
        from torchvision.datasets import ImageFolder

        tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                        T.Normalize(mean, std)])
        root = Path(args.data_path)
        train_set, test_set = ImageFolder(root / "train", tf), ImageFolder(root / "val", tf)
    if train_subset:
        train_set = Subset(train_set, range(min(train_subset, len(train_set))))
    if test_subset:
        test_set = Subset(test_set, range(min(test_subset, len(test_set))))
    return train_set, test_set


@torch.no_grad()
def knn_accuracy(backbone: nn.Module, args, mean, std, device, train_subset=None, test_subset=None) -> float:
    """Weighted 20-NN top-1 (%) of ``backbone`` features, train set -> test set."""
    from .eval.knn import extract_features, knn_classifier

    train, test = eval_datasets(args, mean, std, train_subset, test_subset)
    was_training = backbone.training
    loaders = [DataLoader(d, batch_size=512, num_workers=0) for d in (train, test)]
    train_f, train_y = extract_features(backbone, loaders[0], device=device)
    test_f, test_y = extract_features(backbone, loaders[1], device=device)
    backbone.train(was_training)
    top1, _ = knn_classifier(train_f, train_y, test_f, test_y, k=20, T=0.07)
    return top1


def knn_key(args: argparse.Namespace) -> str:
    """Metrics key of the periodic k-NN: subsets are logged apart from the full-set numbers."""
    return "knn_top1_subset" if args.knn_train_subset or args.knn_test_subset else "knn_top1"


@torch.no_grad()
def raw_pixel_knn() -> float:
    """Fashion-MNIST baseline: the same weighted 20-NN on raw pixels in [0, 1] (cosine)."""
    from .datasets import load_fashion_mnist
    from .eval.knn import knn_classifier

    (train_x, train_y), (test_x, test_y) = load_fashion_mnist(True), load_fashion_mnist(False)
    flat = lambda x: torch.nn.functional.normalize(x.flatten(1).float().div_(255), dim=1)  # noqa: E731
    return knn_classifier(flat(train_x), train_y, flat(test_x), test_y, k=20, T=0.07)[0]


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    rank, world_size, device = init_distributed(args)
    resolve_defaults(args, device)
    is_main = rank == 0
    out = Path(args.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)  # same init on every rank; augmentation is seeded per sample
    torch.backends.cudnn.benchmark = True

    # ---- data -----------------------------------------------------------------------------------
    args.in_chans = image_channels(args)
    loader, sampler, augment_on_device, mean, std = build_data(args, rank, world_size)
    steps_per_epoch = sampler.batches_per_epoch // args.grad_accum_steps
    if steps_per_epoch < 1:
        raise ValueError("fewer batches per epoch than --grad_accum_steps")

    # ---- networks: student = backbone + head; teacher = EMA copy (no drop path) ------------------
    backbone = build_backbone(args)
    features = as_feature_extractor(backbone)
    embed_dim = infer_feature_dim(features, (args.in_chans, args.global_crop_size, args.global_crop_size))
    head = DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head, norm_last_layer=args.norm_last_layer,
                    hidden_dim=args.hidden_dim, bottleneck_dim=args.bottleneck_dim)
    student = MultiCropWrapper(features, head)
    if world_size > 1 and device.type == "cuda" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules()):
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student.to(device)
    if args.channels_last:
        student.to(memory_format=torch.channels_last)  # 4-D weights only; the teacher copies the layout
    teacher = EMATeacher(student)  # official: same weights and buffers, frozen, stays in train mode
    last_layer = head.last_layer_parameters()
    student_ddp: nn.Module = student
    if world_size > 1:
        student_ddp = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    student_fwd, teacher_fwd = student_ddp, teacher
    if args.compile:
        student_fwd, teacher_fwd = torch.compile(student_ddp), torch.compile(teacher)

    # ---- loss, optimizer, schedules --------------------------------------------------------------
    ncrops = args.local_crops_number + 2
    if args.max_steps:
        total_steps = args.max_steps
        epochs = math.ceil(total_steps / steps_per_epoch)
        warmup_steps = min(args.warmup_epochs * steps_per_epoch if args.warmup_steps is None else args.warmup_steps, total_steps)
        sched = lambda base, final, warm=0: cosine_scheduler(base, final, total_steps, 1, warm)  # noqa: E731
    else:
        total_steps, epochs = args.epochs * steps_per_epoch, args.epochs
        if args.warmup_steps is None:  # the official epoch-based arrays, element for element
            warmup_steps = args.warmup_epochs * steps_per_epoch
            sched = lambda base, final, warm=0: cosine_scheduler(base, final, epochs, steps_per_epoch, warm // steps_per_epoch)  # noqa: E731
        else:
            warmup_steps = min(args.warmup_steps, total_steps)
            sched = lambda base, final, warm=0: cosine_scheduler(base, final, total_steps, 1, warm)  # noqa: E731
    dino_loss = DINOLoss(args.out_dim, ncrops, args.warmup_teacher_temp, args.teacher_temp,
                         min(args.warmup_teacher_temp_epochs, epochs), epochs, center_update="manual").to(device)
    optimizer = build_optimizer(args.optimizer, get_params_groups(student))
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    global_batch = args.batch_size_per_gpu * world_size * args.grad_accum_steps
    lr_schedule = sched(args.lr * global_batch / 256.0, args.min_lr, warmup_steps)
    wd_schedule = sched(args.weight_decay, args.weight_decay_end)
    momentum_schedule = sched(args.momentum_teacher, 1.0)

    # ---- resume ----------------------------------------------------------------------------------
    from .checkpoint import CheckpointError, load_checkpoint, make_official_checkpoint, save_checkpoint

    ckpt_path = out / "checkpoint.pth"
    start_step = 0
    if ckpt_path.exists():
        try:
            ckpt = load_checkpoint(ckpt_path)
        except CheckpointError as err:
            print(f"error: cannot resume: {err}. Move the file away to start afresh.", file=sys.stderr, flush=True)
            return 2
        student.load_state_dict(ckpt["student"])
        teacher.module.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        dino_loss.load_state_dict(ckpt["dino_loss"])
        if scaler is not None and "fp16_scaler" in ckpt:
            scaler.load_state_dict(ckpt["fp16_scaler"])
        start_step = int(ckpt["step"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in ckpt:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        if is_main:
            print(f"resumed from {ckpt_path} at step {start_step}", flush=True)

    def save(step: int, epoch: int, path: Path = ckpt_path) -> None:
        if not is_main:
            return
        state = make_official_checkpoint(student, teacher.module, optimizer, epoch, dino_loss, scaler, vars(args),
                                         step=step, rng_cpu=torch.get_rng_state())
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        save_checkpoint(path, state)

    # ---- logging ---------------------------------------------------------------------------------
    def log(record: dict[str, Any]) -> None:
        if is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    random_init_knn = None
    if is_main and start_step == 0 and args.knn_every:
        log({"step": 0, knn_key(args): knn_accuracy(features, args, mean, std, device, args.knn_train_subset,
                                                    args.knn_test_subset),
             "knn_subset": [args.knn_train_subset, args.knn_test_subset]})
    if is_main and start_step == 0 and not args.no_final_knn:
        random_init_knn = knn_accuracy(features, args, mean, std, device)
        print(f"k-NN top-1 at random init: {random_init_knn:.2f}%", flush=True)
        log({"step": 0, "knn_top1": random_init_knn, "random_init": True})
    progress = None
    if is_main and not args.no_progress:
        try:
            from tqdm import tqdm

            # Redirected to a file, a bar redrawn 10 times a second floods the log: redraw every 30 s.
            interval = 0.1 if sys.stderr.isatty() else 30.0
            progress = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="DINO",
                            mininterval=interval, maxinterval=max(interval, 10.0))
        except ImportError:  # an optional extra: fall back to JSON lines
            print("tqdm is not installed (pip install 'dino-pytorch[train]'): logging JSON lines", flush=True)

    # ---- training loop ---------------------------------------------------------------------------
    start_time = time.time()
    step, epoch = start_step, start_step // steps_per_epoch
    epoch_loss_sum, epoch_loss_count = torch.zeros((), device=device), 0
    data_iter = None
    stop_reason = "finished"
    student_ddp.train()
    teacher.train()
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            if data_iter is None or step % steps_per_epoch == 0:
                sampler.set_epoch(epoch, start_batch=(step % steps_per_epoch) * args.grad_accum_steps)
                data_iter = iter(loader)
            set_schedules(optimizer, lr_schedule[step], wd_schedule[step])
            optimizer.zero_grad(set_to_none=True)
            for micro in range(args.grad_accum_steps):
                images, _ = next(data_iter)
                if augment_on_device is not None:
                    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 7919 + micro * 131 + rank)
                    views = augment_on_device(images.to(device, non_blocking=True), generator=generator)
                else:
                    views = [im.to(device, non_blocking=True) for im in images]
                if args.channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                sync = contextlib.nullcontext()
                if world_size > 1 and micro < args.grad_accum_steps - 1:
                    sync = student_ddp.no_sync()  # all-reduce gradients once per optimizer step
                with sync, autocast_context(args.precision, device):
                    teacher_output = teacher_fwd(views[:2])
                    student_output = student_fwd(views)
                    loss = dino_loss(student_output, teacher_output, epoch) / args.grad_accum_steps
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                epoch_loss_sum += loss.detach()
            epoch_loss_count += 1
            if scaler is not None:
                scaler.unscale_(optimizer)
            if args.clip_grad:
                clip_gradients_(student.parameters(), args.clip_grad)
            if epoch < args.freeze_last_layer:
                cancel_gradients_(last_layer)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            dino_loss.update_center()
            momentum = teacher.update(student, momentum=float(momentum_schedule[step]))
            step += 1

            if step % args.log_every == 0 or step == total_steps:
                loss_value = loss.item() * args.grad_accum_steps  # the only per-log host sync
                if not math.isfinite(loss_value):
                    raise Stop(f"loss is non-finite ({loss_value}) at step {step} (epoch {epoch}); stopping. "
                               f"The last good checkpoint is kept at {ckpt_path}")
                record = {"step": step, "epoch": epoch, "train_loss": loss_value, "lr": lr_schedule[step - 1],
                          "wd": wd_schedule[step - 1], "momentum": momentum,
                          "teacher_temp": dino_loss.teacher_temp_at(epoch)}
                with torch.no_grad():
                    probs = dino_loss.teacher_probs(list(teacher_output.float().chunk(2)), record["teacher_temp"])
                    record.update({k: v.item() for k, v in collapse_metrics(torch.cat(probs), dino_loss.center).items()})
                log(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{record['lr']:.2e}", m=f"{momentum:.4f}",
                                         t_temp=f"{record['teacher_temp']:.3f}", H=f"{record['teacher_entropy']:.2f}")
                elif is_main:
                    print(json.dumps(record), flush=True)
            if progress is not None:
                progress.update(1)

            if args.knn_every and step % args.knn_every == 0 and step < total_steps and is_main:
                top1 = knn_accuracy(teacher.module.backbone, args, mean, std, device,
                                    args.knn_train_subset, args.knn_test_subset)
                log({"step": step, knn_key(args): top1, "knn_subset": [args.knn_train_subset, args.knn_test_subset]})

            end_of_epoch = step % steps_per_epoch == 0
            timed_out = args.time_budget_min is not None and time.time() - start_time > 60 * args.time_budget_min
            if end_of_epoch or step == total_steps or timed_out or (args.save_every_steps and step % args.save_every_steps == 0):
                epoch_mean = (epoch_loss_sum / max(epoch_loss_count, 1)).item()  # mean of per-step losses
                weights_finite = torch.stack([torch.isfinite(q).all() for q in student.parameters()]).all().item()
                if not (math.isfinite(epoch_mean) and weights_finite):
                    what = "loss" if not math.isfinite(epoch_mean) else "student weights"
                    raise Stop(f"{what} became non-finite by step {step} (epoch {epoch}); stopping without "
                               f"saving. The last good checkpoint is kept at {ckpt_path}")
                save(step, epoch + 1 if end_of_epoch else epoch)
                if end_of_epoch:
                    if is_main:
                        with open(out / "log.txt", "a") as f:  # official: one JSON line per epoch
                            f.write(json.dumps({"train_loss": epoch_mean, "train_lr": lr_schedule[step - 1],
                                                "train_wd": wd_schedule[step - 1], "epoch": epoch}) + "\n")
                        if args.saveckp_freq and epoch % args.saveckp_freq == 0:
                            save(step, epoch + 1, out / f"checkpoint{epoch:04}.pth")
                    epoch_loss_sum.zero_()
                    epoch_loss_count = 0
                if os.environ.get(CRASH_ENV) == str(step):
                    os._exit(17)  # simulated crash for the resume tests
            if timed_out:
                stop_reason = f"time budget of {args.time_budget_min} min reached"
                break
    except Stop as stop:
        if progress is not None:
            progress.close()
        print(f"error: {stop}", file=sys.stderr, flush=True)
        return 1
    if progress is not None:
        progress.close()
    if is_main:
        print(f"stopped at step {step}/{total_steps}: {stop_reason} ({time.time() - start_time:.0f}s)", flush=True)

    # ---- final evaluation and pictures -----------------------------------------------------------
    if is_main:
        if not args.no_final_knn:
            top1 = knn_accuracy(teacher.module.backbone, args, mean, std, device)
            log({"step": step, "knn_top1": top1, "final": True})
            summary = {"knn_top1": top1, "knn_top1_random_init": random_init_knn, "steps": step}
            if args.dataset == "fashion_mnist":
                summary["knn_top1_raw_pixels"] = raw_pixel_knn()
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            rows = [("raw pixels", summary.get("knn_top1_raw_pixels")),
                    (f"{args.arch} at random init", random_init_knn),
                    (f"{args.arch} after DINO ({step} steps)", top1)]
            rows = [(name, value) for name, value in rows if value is not None]
            width = max(len(name) for name, _ in rows)
            print("k-NN top-1 (k=20, T=0.07), train set -> test set:")
            for name, value in rows:
                print(f"  {name:<{width}}  {value:6.2f}%", flush=True)
        try:
            from .visualize import plot_curves

            plot_curves(out / "metrics.jsonl", out / "curves.png")
        except ImportError as err:  # matplotlib is an optional extra
            print(f"curves not plotted ({err}); pip install 'dino-pytorch[train]'", flush=True)
        if args.arch in VIT_ARCHS and args.attention_maps:
            from .visualize import save_dataset_attention_maps

            test_images = eval_datasets(args, mean, std, test_subset=args.attention_maps)[1]
            save_dataset_attention_maps(teacher.module.backbone, test_images, out / "attention", args.attention_maps)
    if distributed.is_distributed():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
