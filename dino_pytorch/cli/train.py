"""dino-train: the reference training program, the library's own three-line DINO plus a loop.

    dino-train --dataset fashion_mnist --arch convnet --output_dir runs/fmnist
    torchrun --nproc_per_node=2 -m dino_pytorch.train ...          # DDP (gloo on CPU, nccl on CUDA)

Every official ``main_dino.py`` flag keeps its name and default; the iteration follows the official
order (per-step lr / wd / momentum, teacher on the global views, per-parameter clip, last-layer
freeze, EMA). The run resumes automatically from ``output_dir/checkpoint.pth``, and every
checkpoint records the model configuration, so the evaluation programs need no architecture flags.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import distributed
from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..dino import DINO
from ..optim import build_optimizer
from ..precision import autocast, grad_scaler
from ..schedules import DINOSchedules
from ._setup import (
    UsageError,
    backbone_from_flags,
    config_from_flags,
    eval_datasets,
    first,
    knn_top1,
    output_dir,
    raw_pixel_knn,
    resolve_device,
    run_program,
)
from .train_data import build_data, make_views
from .train_flags import get_args_parser, resolve_defaults
from .train_report import RunLog, final_report, write_pictures


def init_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """Process group from torchrun's env vars (gloo on CPU, nccl on CUDA); none for one process."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=args.dist_url,
                                rank=rank, world_size=world_size)
    return rank, world_size, device


def schedule_lengths(args: argparse.Namespace, steps_per_epoch: int) -> tuple[int, int, int]:
    """(total steps, epochs, warm-up steps): from --max_steps, else the official --epochs."""
    total = args.max_steps or args.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    warmup = args.warmup_epochs * steps_per_epoch if args.warmup_steps is None else args.warmup_steps
    return total, epochs, min(warmup, total)


def resume(path: Path, dino: DINO, optimizer: torch.optim.Optimizer, scaler: Any, device: torch.device) -> None:
    """Restore the run saved at ``path``: DINO (student, teacher, centre, step), optimizer, scaler, RNG."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise UsageError(f"cannot resume: {err}. Move the file away to start afresh.") from None
    dino.load_official_checkpoint(ckpt)
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and "fp16_scaler" in ckpt:
        scaler.load_state_dict(ckpt["fp16_scaler"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in ckpt:
        torch.cuda.set_rng_state(ckpt["rng_cuda"], device)


def optimizer_step(dino: DINO, optimizer: torch.optim.Optimizer, scaler: Any, clip_grad: float,
                   freeze_last_layer: bool) -> None:
    """Official order: unscale, per-parameter clip, last-layer freeze, step (through the scaler)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        dino.clip_gradients_(clip_grad)
    if freeze_last_layer:
        dino.cancel_last_layer_gradients_()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dino-train``; returns the exit status (0 finished, 1 stopped on a non-finite loss)."""
    return run_program("dino-train", _main, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    # ---- config ----------------------------------------------------------------------------------
    args = get_args_parser().parse_args(argv)
    rank, world_size, device = init_distributed(args)
    resolve_defaults(args, device)
    is_main = rank == 0
    out = output_dir(args.output_dir) if is_main else Path(args.output_dir)
    torch.manual_seed(args.seed)  # same init on every rank; augmentation is seeded per sample
    torch.backends.cudnn.benchmark = True

    # ---- data ------------------------------------------------------------------------------------
    config = config_from_flags(args, args.dataset, args.in_chans, args.global_crop_size)
    mean, std = config["data"]["mean"], config["data"]["std"]
    loader, sampler, augment_on_device = build_data(args, mean, std, rank, world_size)
    steps_per_epoch = sampler.batches_per_epoch // args.grad_accum_steps
    if steps_per_epoch < 1:
        raise UsageError(f"--grad_accum_steps {args.grad_accum_steps}: more than the {sampler.batches_per_epoch} "
                         "batches of an epoch")
    total_steps, epochs, warmup_steps = schedule_lengths(args, steps_per_epoch)

    # ---- DINO: the library's three-line path -----------------------------------------------------
    global_batch = args.batch_size_per_gpu * world_size * args.grad_accum_steps
    schedules = DINOSchedules.official(
        total_steps, lr=args.lr * global_batch / 256.0, min_lr=args.min_lr, warmup_steps=warmup_steps,
        weight_decay=args.weight_decay, weight_decay_end=args.weight_decay_end,
        momentum_teacher=args.momentum_teacher)
    head = dict(out_dim=args.out_dim, use_bn=args.use_bn_in_head, norm_last_layer=args.norm_last_layer,
                hidden_dim=args.hidden_dim, bottleneck_dim=args.bottleneck_dim)
    dino = DINO(backbone_from_flags(config), **head, input_size=(args.in_chans,) + (args.global_crop_size,) * 2,
                teacher_temp=args.teacher_temp, warmup_teacher_temp=args.warmup_teacher_temp,
                warmup_teacher_temp_epochs=min(args.warmup_teacher_temp_epochs, epochs), nepochs=epochs,
                schedules=schedules).to(device)
    config["head"] = dict(in_dim=dino.student.head.in_dim, nlayers=3, **head)
    if args.channels_last:
        dino.to(memory_format=torch.channels_last)  # 4-D weights of student and teacher
    if world_size > 1:
        dino.distribute(device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        dino.compile_forwards()
    optimizer = build_optimizer(args.optimizer, dino.param_groups())
    scaler = grad_scaler(args.precision, device)

    # ---- resume ----------------------------------------------------------------------------------
    ckpt_path = out / "checkpoint.pth"
    if ckpt_path.exists():
        resume(ckpt_path, dino, optimizer, scaler, device)
        if is_main:
            print(f"resumed from {ckpt_path} at step {dino.step}", flush=True)

    def save(epoch: int, path: Path = ckpt_path) -> None:
        if is_main:
            extra = {"rng_cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
            save_checkpoint(path, dino.official_checkpoint(optimizer, epoch, scaler, vars(args), model_config=config,
                                                           rng_cpu=torch.get_rng_state(), **extra))

    def knn(train_n: Optional[int] = None, test_n: Optional[int] = None) -> float:
        train_set, test_set = eval_datasets(args.dataset, eval_path, args.in_chans, args.global_crop_size)
        return knn_top1(dino.teacher_backbone, first(train_set, train_n), first(test_set, test_n), device)

    # ---- logging and the k-NN at random init ---------------------------------------------------------
    eval_path = None if args.dataset == "fashion_mnist" else args.data_path
    run_log = RunLog(out, is_main, tensorboard=args.tensorboard)
    subsets = [args.knn_train_subset, args.knn_test_subset]
    periodic_key = "knn_top1_subset" if any(subsets) else "knn_top1"
    random_init_knn = None
    if is_main and dino.step == 0 and args.knn_every:
        run_log.metrics({"step": 0, periodic_key: knn(*subsets), "knn_subset": subsets})
    if is_main and dino.step == 0 and not args.no_final_knn:
        random_init_knn = knn()
        print(f"k-NN top-1 at random init: {random_init_knn:.2f}%", flush=True)
        run_log.metrics({"step": 0, "knn_top1": random_init_knn, "random_init": True})
    if not args.no_progress:
        run_log.start_progress(total_steps, dino.step)

    # ---- training loop ---------------------------------------------------------------------------
    start_time, data_iter, stop_reason = time.time(), None, "finished"
    epoch_loss_sum, epoch_loss_count = torch.zeros((), device=device), 0
    dino.train()
    while dino.step < total_steps:
        step, epoch = dino.step, dino.step // steps_per_epoch
        if data_iter is None or step % steps_per_epoch == 0:
            sampler.set_epoch(epoch, start_batch=(step % steps_per_epoch) * args.grad_accum_steps)
            data_iter = iter(loader)
        values = dino.apply_schedules(optimizer)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(args.grad_accum_steps):
            views = make_views(next(data_iter)[0], augment_on_device, args, step, micro, rank, device)
            with dino.no_sync(micro < args.grad_accum_steps - 1), autocast(args.precision, device):
                loss = dino(views, epoch) / args.grad_accum_steps
                (scaler.scale(loss) if scaler is not None else loss).backward()
            epoch_loss_sum += loss.detach()
        epoch_loss_count += 1
        optimizer_step(dino, optimizer, scaler, args.clip_grad, freeze_last_layer=epoch < args.freeze_last_layer)
        momentum = dino.update_teacher()
        step += 1

        if step % args.log_every == 0 or step == total_steps:
            loss_value = loss.item() * args.grad_accum_steps  # the only per-log host sync
            if not math.isfinite(loss_value):
                return run_log.fail(f"loss is non-finite ({loss_value}) at step {step} (epoch {epoch}); stopping. "
                                    f"The last good checkpoint is kept at {ckpt_path}")
            run_log.step({"step": step, "epoch": epoch, "train_loss": loss_value, "lr": values["lr"],
                          "wd": values["weight_decay"], "momentum": momentum,
                          "teacher_temp": dino.criterion.teacher_temp_at(epoch),
                          **{k: v.item() for k, v in dino.collapse_metrics().items()}})
        run_log.advance()
        if args.knn_every and step % args.knn_every == 0 and step < total_steps and is_main:
            run_log.metrics({"step": step, periodic_key: knn(*subsets), "knn_subset": subsets})

        end_of_epoch = step % steps_per_epoch == 0
        timed_out = args.time_budget_min is not None and time.time() - start_time > 60 * args.time_budget_min
        periodic = bool(args.save_every_steps) and step % args.save_every_steps == 0
        if end_of_epoch or step == total_steps or timed_out or periodic:
            epoch_mean = (epoch_loss_sum / max(epoch_loss_count, 1)).item()  # mean of per-step losses
            weights_finite = torch.stack([torch.isfinite(q).all() for q in dino.student.parameters()]).all().item()
            if not (math.isfinite(epoch_mean) and weights_finite):
                what = "loss" if not math.isfinite(epoch_mean) else "student weights"
                return run_log.fail(f"{what} became non-finite by step {step} (epoch {epoch}); stopping without "
                                    f"saving. The last good checkpoint is kept at {ckpt_path}")
            save(epoch + 1 if end_of_epoch else epoch)
            if end_of_epoch:
                run_log.epoch({"train_loss": epoch_mean, "train_lr": values["lr"],
                               "train_wd": values["weight_decay"], "epoch": epoch})  # official log.txt line
                if args.saveckp_freq and epoch % args.saveckp_freq == 0:
                    save(epoch + 1, out / f"checkpoint{epoch:04}.pth")
                epoch_loss_sum.zero_()
                epoch_loss_count = 0
        if timed_out:
            stop_reason = f"time budget of {args.time_budget_min} min reached"
            break
    run_log.close()

    # ---- final evaluation and pictures -----------------------------------------------------------
    if is_main:
        print(f"stopped at step {dino.step}/{total_steps}: {stop_reason} ({time.time() - start_time:.0f}s)", flush=True)
        if not args.no_final_knn:
            top1 = knn()
            run_log.metrics({"step": dino.step, "knn_top1": top1, "final": True})
            raw = raw_pixel_knn() if args.dataset == "fashion_mnist" else None
            final_report(out, args.arch, dino.step, top1, random_init_knn, raw)
        write_pictures(out, dino.teacher_backbone, config, args.attention_maps, eval_path, run_log)
    if distributed.is_distributed():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
