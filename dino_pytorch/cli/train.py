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
import contextlib
import hashlib
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import distributed
from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..diagnostics import CollapseMonitor, CollapseThresholds
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
from .train_flags import check_resume_fits, get_args_parser, resolve_defaults
from .train_report import RunControl, RunLog, final_report, garment_attention, random_init_evals, write_pictures


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


# The flags that define the schedules (lr, weight decay, momentum, teacher temperature, last-layer
# freeze) and the data position of a step: a resume must not change them silently.
SCHEDULE_FLAGS = ("max_steps", "epochs", "warmup_steps", "warmup_epochs", "lr", "min_lr", "weight_decay",
                  "weight_decay_end", "momentum_teacher", "teacher_temp", "warmup_teacher_temp",
                  "warmup_teacher_temp_epochs", "freeze_last_layer", "batch_size_per_gpu", "grad_accum_steps")
STALE_TEMP_GLOB = ".checkpoint*.pth.tmp-*"  # save_checkpoint's temporary files, left by a kill mid-save


def model_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The global RNG's seed for one micro-batch's forward and backward (drop path, dropout, any
    stochastic layer of any backbone): a function of its position only, never of the RNG's history,
    so a resumed run draws exactly what the uninterrupted one drew."""
    digest = hashlib.blake2b(f"dino-train/{seed}/{step}/{micro}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def remove_stale_temp_files(out: Path) -> list[str]:
    """Delete the temporary files of saves a kill interrupted (one run per output_dir)."""
    removed = []
    for path in sorted(out.glob(STALE_TEMP_GLOB)):
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path.name)
    return removed


def first_non_finite(value: Any, name: str) -> Optional[str]:
    """The name of the first floating tensor in ``value`` holding a NaN or an inf, else None."""
    if isinstance(value, torch.Tensor):
        return name if value.is_floating_point() and not bool(torch.isfinite(value).all()) else None
    items: Any = ()
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    for key, item in items:
        found = first_non_finite(item, f"{name}[{key!r}]")
        if found is not None:
            return found
    return None


def schedule_change(saved: Mapping[str, Any], args: argparse.Namespace, saved_total: Any, total: int) -> Optional[str]:
    """How this run's schedules differ from the checkpoint's (``saved`` are its args), or None."""
    for name in SCHEDULE_FLAGS:
        if name not in saved:
            continue  # a file from before the flag existed
        overrider = {"epochs": "max_steps", "warmup_epochs": "warmup_steps"}.get(name)
        if overrider and getattr(args, overrider) is not None and saved.get(overrider) is not None:
            continue  # overridden by the step flag in both runs
        if saved[name] != getattr(args, name):
            return f"--{name} is {getattr(args, name)} here but {saved[name]} in the checkpoint's run"
    if saved_total is not None and int(saved_total) != total:
        return f"the schedules span {total} steps here but {int(saved_total)} in the checkpoint's run"
    return None


def resume(path: Path, dino: DINO, optimizer: torch.optim.Optimizer, scaler: Any, device: torch.device,
           args: argparse.Namespace, total_steps: int) -> None:
    """Restore the run saved at ``path``: DINO (student, teacher, centre, step), optimizer, scaler, RNG.

    Refused in one line: an unreadable file, a non-finite entry, or schedules that differ from the
    checkpoint's (unless ``--allow_schedule_change``)."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise UsageError(f"cannot resume: {err}. Move the file away to start afresh.") from None
    check_resume_fits(ckpt, dino.student, path)  # another width or head: one line, not a traceback
    for entry in ("student", "teacher", "dino_loss", "optimizer", "fp16_scaler"):
        bad = first_non_finite(ckpt.get(entry, {}), entry)
        if bad is not None:
            raise UsageError(f"cannot resume from {path}: {bad} holds non-finite values (NaN or inf). "
                             "Move the file away (or restore an older one) to start afresh.")
    change = schedule_change(ckpt.get("args") or {}, args, ckpt.get("total_steps"), total_steps)
    if change is not None and not args.allow_schedule_change:
        raise UsageError(f"cannot resume from {path}: {change}, which would change its schedules mid-run; "
                         "pass --allow_schedule_change to resume with the new ones")
    dino.load_official_checkpoint(ckpt)
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and "fp16_scaler" in ckpt:
        scaler.load_state_dict(ckpt["fp16_scaler"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in ckpt:
        torch.cuda.set_rng_state(ckpt["rng_cuda"], device)


class Checkpointer:
    """Rank 0 writes ``output_dir/checkpoint.pth`` (atomically); the others only keep count."""

    def __init__(self, path: Path, dino: DINO, optimizer: torch.optim.Optimizer, scaler: Any,
                 args: argparse.Namespace, config: dict[str, Any], device: torch.device, is_main: bool,
                 total_steps: int) -> None:
        self.path, self.dino, self.optimizer, self.scaler = path, dino, optimizer, scaler
        self.args, self.config, self.device, self.is_main = args, config, device, is_main
        self.total_steps = total_steps
        self.saved_step: Optional[int] = dino.step if path.exists() else None

    def save(self, epoch: int, path: Optional[Path] = None) -> Optional[str]:
        """Write the run's state; returns None, or the one-line reason the write failed (a full
        disk, say), the previous file at ``path`` being intact."""
        path = path or self.path
        if not self.is_main:
            return None
        extra = {"rng_cuda": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}
        state = self.dino.official_checkpoint(self.optimizer, epoch, self.scaler, vars(self.args),
                                              model_config=self.config, rng_cpu=torch.get_rng_state(),
                                              total_steps=self.total_steps, **extra)
        try:
            save_checkpoint(path, state)
        except (OSError, RuntimeError) as failure:
            # torch.save reports a failed write (ENOSPC, EIO) as a RuntimeError whose context is the OSError.
            err = failure if isinstance(failure, OSError) else failure.__context__
            if not isinstance(err, OSError):
                raise
            kept = (f"The checkpoint of step {self.saved_step} at {self.path} is intact" if self.saved_step is not None
                    else "No checkpoint was written yet")
            return f"cannot write {path} at step {self.dino.step}: {err.strerror or err}; stopping. {kept}"
        if path == self.path:
            self.saved_step = self.dino.step
        return None


def optimizer_step(dino: DINO, optimizer: torch.optim.Optimizer, scaler: Any, clip_grad: float,
                   freeze_last_layer: bool) -> None:
    """Official order: unscale, per-parameter clip, last-layer freeze, step (through the scaler)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        dino.clip_gradients_(clip_grad)
    if freeze_last_layer:
        dino.cancel_last_layer_gradients_()
    dino.optimizer_step(optimizer, scaler)  # skipped after a non-finite loss


def warn_cpu_batchnorm(dino: DINO, device: torch.device, is_main: bool) -> None:
    """Several CPU processes cannot share BatchNorm statistics (torch's SyncBatchNorm needs CUDA): say so once."""
    if is_main and device.type == "cpu" and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in dino.student.modules()):
        print("warning: BatchNorm statistics stay per rank on the CPU: torch's SyncBatchNorm needs CUDA, so each "
              "rank normalises its own batch and the run differs from one process on the whole batch "
              "(a ViT has no BatchNorm)", file=sys.stderr, flush=True)


def diverged(report: str, checkpointer: Checkpointer) -> str:
    """The one line a run stopped by a non-finite step ends with: what, where, and what is kept."""
    kept = (f"the last good checkpoint is {checkpointer.path} (step {checkpointer.saved_step})"
            if checkpointer.saved_step is not None else "there is no last good checkpoint: none was written before it")
    return f"{report}; stopping without saving after it: {kept}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dino-train``; returns the exit status: 0 finished (or its --time_budget_min ran out), 1 stopped on
    a non-finite loss or a failed save, 2 a user error, 143 / 130 stopped by SIGTERM / SIGINT (saved)."""
    return run_program("dino-train", _main, argv)


def build_schedules(args: argparse.Namespace, total_steps: int, warmup_steps: int, world_size: int) -> DINOSchedules:
    """The official per-step lr (scaled by the global batch / 256), weight decay and momentum."""
    global_batch = args.batch_size_per_gpu * world_size * args.grad_accum_steps
    return DINOSchedules.official(
        total_steps, lr=args.lr * global_batch / 256.0, min_lr=args.min_lr, warmup_steps=warmup_steps,
        weight_decay=args.weight_decay, weight_decay_end=args.weight_decay_end,
        momentum_teacher=args.momentum_teacher)


def _main(argv: Optional[Sequence[str]]) -> int:
    # ---- config ----------------------------------------------------------------------------------
    args = get_args_parser().parse_args(argv)
    rank, world_size, device = init_distributed(args)
    resolve_defaults(args, device, announce=rank == 0)
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

    # ---- DINO: the library's three-line path, and the optimizer ----------------------------------
    head = dict(out_dim=args.out_dim, use_bn=args.use_bn_in_head, norm_last_layer=args.norm_last_layer,
                hidden_dim=args.hidden_dim, bottleneck_dim=args.bottleneck_dim)
    dino = DINO(backbone_from_flags(config), **head, input_size=(args.in_chans,) + (args.global_crop_size,) * 2,
                teacher_temp=args.teacher_temp, warmup_teacher_temp=args.warmup_teacher_temp,
                warmup_teacher_temp_epochs=min(args.warmup_teacher_temp_epochs, epochs), nepochs=epochs,
                schedules=build_schedules(args, total_steps, warmup_steps, world_size),
                koleo_weight=args.koleo_weight).to(device)
    config["head"] = dict(in_dim=dino.student.head.in_dim, nlayers=3, **head)
    if args.channels_last:
        dino.to(memory_format=torch.channels_last)  # 4-D weights of student and teacher
    if world_size > 1:
        dino.distribute(device_ids=[device.index] if device.type == "cuda" else None)
        warn_cpu_batchnorm(dino, device, is_main)
    if args.compile:
        dino.compile_forwards()
    optimizer = build_optimizer(args.optimizer, dino.param_groups())
    scaler = grad_scaler(args.precision, device)

    # ---- resume ----------------------------------------------------------------------------------
    ckpt_path = out / "checkpoint.pth"
    if is_main and (stale := remove_stale_temp_files(out)):
        print(f"removed {len(stale)} temporary file(s) of interrupted saves: {', '.join(stale)}", flush=True)
    if ckpt_path.exists():
        resume(ckpt_path, dino, optimizer, scaler, device, args, total_steps)
        if is_main:
            print(f"resumed from {ckpt_path} at step {dino.step}", flush=True)
    checkpointer = Checkpointer(ckpt_path, dino, optimizer, scaler, args, config, device, is_main, total_steps)

    def knn(train_n: Optional[int] = None, test_n: Optional[int] = None) -> float:
        train_set, test_set = eval_datasets(args.dataset, eval_path, args.in_chans, args.global_crop_size)
        return knn_top1(dino.teacher_backbone, first(train_set, train_n), first(test_set, test_n), device)

    # ---- logging and the k-NN at random init ---------------------------------------------------------
    eval_path = None if args.dataset == "fashion_mnist" else args.data_path
    monitor = CollapseMonitor(args.out_dim, CollapseThresholds(warmup_steps=warmup_steps))  # says collapse once
    run_log = RunLog(out, is_main, args.tensorboard, monitor)
    subsets = [args.knn_train_subset, args.knn_test_subset]
    periodic_key = "knn_top1_subset" if any(subsets) else "knn_top1"
    random_init_knn, random_init_garment = None, None
    if is_main and dino.step == 0 and args.knn_every:
        run_log.metrics({"step": 0, periodic_key: knn(*subsets), "knn_subset": subsets})
    if is_main and dino.step == 0 and not args.no_final_knn:
        random_init_knn, random_init_garment = random_init_evals(knn, dino.teacher_backbone, config, run_log)
    if not args.no_progress:
        run_log.start_progress(total_steps, dino.step)

    # ---- training loop ---------------------------------------------------------------------------
    control = RunControl(args, world_size, device)  # SIGTERM / SIGINT, wall-clock saves, time budget
    data_iter = None
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
            images, _, keys = next(data_iter)  # keys: the samples' global indices, epoch * N + index
            views = make_views(images, augment_on_device, args, step, micro, rank, device, keys=keys)
            torch.manual_seed(model_seed(args.seed, step, micro, rank))  # drop path: no RNG history
            with dino.no_sync(micro < args.grad_accum_steps - 1), autocast(args.precision, device):
                loss = dino(views, epoch) / args.grad_accum_steps
                (scaler.scale(loss) if scaler is not None else loss).backward()
            epoch_loss_sum += loss.detach()
        epoch_loss_count += 1
        optimizer_step(dino, optimizer, scaler, args.clip_grad, freeze_last_layer=epoch < args.freeze_last_layer)
        momentum = dino.update_teacher()
        step += 1
        log_point = step % args.log_every == 0 or step == total_steps
        if (device.type == "cpu" or log_point) and (report := dino.nonfinite_report()) is not None:
            return run_log.fail(diverged(report, checkpointer))  # read where the host syncs anyway
        if log_point:
            loss_value = loss.item() * args.grad_accum_steps  # the only per-log host sync
            run_log.step({"step": step, "epoch": epoch, "train_loss": loss_value, "lr": values["lr"],
                          "wd": values["weight_decay"], "momentum": momentum,
                          "teacher_temp": dino.criterion.teacher_temp_at(epoch),
                          **{k: v.item() for k, v in dino.collapse_metrics().items()}})
        run_log.advance()
        if args.knn_every and step % args.knn_every == 0 and step < total_steps and is_main:
            run_log.metrics({"step": step, periodic_key: knn(*subsets), "knn_subset": subsets})

        end_of_epoch = step % steps_per_epoch == 0
        periodic = bool(args.save_every_steps) and step % args.save_every_steps == 0
        if control.poll(step) or end_of_epoch or step == total_steps or periodic:
            if (report := dino.nonfinite_report()) is not None:  # never save after a non-finite step
                return run_log.fail(diverged(report, checkpointer))
            epoch_mean = (epoch_loss_sum / max(epoch_loss_count, 1)).item()  # mean of per-step losses
            failure = checkpointer.save(epoch + 1 if end_of_epoch else epoch)
            control.saved()
            if end_of_epoch:
                run_log.epoch({"train_loss": epoch_mean, "train_lr": values["lr"],
                               "train_wd": values["weight_decay"], "epoch": epoch})  # official log.txt line
                if args.saveckp_freq and epoch % args.saveckp_freq == 0 and not failure:
                    failure = checkpointer.save(epoch + 1, out / f"checkpoint{epoch:04}.pth")
                epoch_loss_sum.zero_()
                epoch_loss_count = 0
            if failure:
                return run_log.fail(failure)
        if control.stop_reason:
            break
    run_log.close()
    control.close()

    # ---- final evaluation and pictures -----------------------------------------------------------
    elapsed = time.time() - control.start
    if is_main:
        print(f"stopped at step {dino.step}/{total_steps}: {control.stop_reason or 'finished'} ({elapsed:.0f}s)"
              + (f"; checkpoint saved, exit status {control.exit_code}" if control.exit_code else ""), flush=True)
    if control.exit_code:
        run_log.finish([])
    elif is_main:
        if not args.no_final_knn:
            top1 = knn()
            run_log.metrics({"step": dino.step, "knn_top1": top1, "final": True})
            raw = raw_pixel_knn() if args.dataset == "fashion_mnist" else None
            final_report(out, args.arch, dino.step, top1, random_init_knn, raw,
                         garment_attention(run_log, dino.teacher_backbone, config, dino.step), random_init_garment)
        write_pictures(out, dino.teacher_backbone, config, args.attention_maps, eval_path, run_log,
                       retrieval=not args.no_final_knn)
    if distributed.is_distributed():
        dist.barrier()
        dist.destroy_process_group()
    return control.exit_code


if __name__ == "__main__":
    sys.exit(main())
