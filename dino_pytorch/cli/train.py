"""dino-train: the reference training program, the library's own three-line DINO plus a loop.

    dino-train --dataset fashion_mnist --arch convnet --output_dir runs/fmnist
    torchrun --nproc_per_node=2 -m dino_pytorch.train ...          # DDP (gloo on CPU, nccl on CUDA)
    torchrun --nproc_per_node=8 -m dino_pytorch.train --fsdp ...   # FSDP2: student and teacher sharded

Every official ``main_dino.py`` flag keeps its name and default; the iteration follows the official
order (per-step lr / wd / momentum, teacher on the global views, per-parameter clip, last-layer
freeze, EMA). The run resumes automatically from ``output_dir/checkpoint.pth``, and every
checkpoint records the model configuration, so the evaluation programs need no architecture flags.

Read :func:`_main` top to bottom (set-up, DINO, resume, evaluations), then :class:`TrainLoop`.
The Fashion-MNIST demo's extra numbers and pictures hang on the run as a
:class:`~dino_pytorch.cli.report_hook.ReportHook` (:mod:`~dino_pytorch.cli.demo_report`).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union, cast

import torch
import torch.distributed as dist

from .. import distributed
from ..activation_checkpointing import checkpoint_blocks
from ..checkpoint import CheckpointError
from ..diagnostics import CollapseMonitor, CollapseThresholds
from ..dino import DINO
from ..optim import build_optimizer
from ..precision import autocast, grad_scaler
from ..pretrained import WeightsDoNotFit, load_pretrained
from ..schedules import DINOSchedules
from ..sharded_checkpoint import unsharded_state
from ._setup import UsageError, backbone_from_flags, config_from_flags, output_dir, resolve_device, run_program
from .demo_report import FashionMNISTDemo
from .report_hook import ReportHook
from .run_control import RunControl
from .train_checkpoint import Checkpointer, resume_or_start
from .train_data import TrainData, build_data, make_views
from .train_distill import distill_teacher_from_flags
from .train_evals import KnnEvals
from .train_flags import get_args_parser, ibot_config, resolve_defaults
from .train_gram import gram_config, split_views
from .train_report import RunLog, write_pictures
from .train_sources import OwnDataKnn, open_train_data, own_attention_maps


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


def epoch_steps(batches_per_epoch: int, grad_accum_steps: int) -> int:
    """Optimizer steps per epoch; an epoch shorter than one step is a user error."""
    if batches_per_epoch < grad_accum_steps:
        raise UsageError(f"--grad_accum_steps {grad_accum_steps}: more than the {batches_per_epoch} "
                         "batches of an epoch")
    return batches_per_epoch // grad_accum_steps


def schedule_lengths(args: argparse.Namespace, steps_per_epoch: int) -> tuple[int, int, int]:
    """(total steps, epochs, warm-up steps): from --max_steps, else the official --epochs."""
    total = args.max_steps or args.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    warmup = args.warmup_epochs * steps_per_epoch if args.warmup_steps is None else args.warmup_steps
    return total, epochs, min(warmup, total)


def model_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The global RNG's seed for one micro-batch's forward and backward (drop path, dropout, any
    stochastic layer of any backbone): a function of its position only, never of the RNG's history,
    so a resumed run draws exactly what the uninterrupted one drew."""
    digest = hashlib.blake2b(f"dino-train/{seed}/{step}/{micro}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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


def distribute(dino: DINO, args: argparse.Namespace, device: torch.device, world_size: int, is_main: bool) -> None:
    """``--activation_checkpointing`` on the student's blocks, then DDP, or with ``--fsdp`` FSDP2 (bf16
    gathered weights and fp32 gradient reduction with ``--precision bf16`` on CUDA); one process: neither."""
    if args.activation_checkpointing:
        checkpoint_blocks(dino.backbone)
    if world_size == 1:
        return
    if args.fsdp:
        bf16 = args.precision == "bf16" and device.type == "cuda"  # on the CPU bf16 stays autocast's alone
        # FSDP2 warns that the nested heads' output is a view; DINO's loss never writes into it in place
        # (tests/test_fsdp.py checks the gradients against one process), so the warning is only noise.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        dino.distribute(strategy="fsdp", param_dtype=torch.bfloat16 if bf16 else None)
    else:
        dino.distribute(device_ids=[device.index] if device.type == "cuda" else None)
    warn_cpu_batchnorm(dino, device, is_main)


class WholeTeacher:
    """What the evaluations read of a run whose teacher FSDP shards: the step, and on rank 0 a plain copy
    of the teacher backbone, refreshed by :meth:`gather` (a collective: every rank calls it), so that
    rank 0 alone can run it."""

    def __init__(self, dino: DINO, config: dict[str, Any], device: torch.device, is_main: bool) -> None:
        self.dino, self.config, self.device, self.is_main = dino, config, device, is_main
        self.teacher_backbone: Any = None

    @property
    def step(self) -> int:
        return self.dino.step

    def gather(self) -> None:
        state = unsharded_state(self.dino.teacher_backbone)  # the whole weights on every rank, for a moment
        if self.is_main:
            backbone = backbone_from_flags(self.config)
            backbone.load_state_dict(state)
            self.teacher_backbone = backbone.to(self.device).eval().requires_grad_(False)


def gather(view: Union[DINO, WholeTeacher], needed: bool) -> None:
    """Before an evaluation: a sharded teacher's whole copy (all ranks call it); nothing for any other."""
    if needed and isinstance(view, WholeTeacher):
        view.gather()


def loss_parts(dino: DINO) -> dict[str, float]:
    """The last micro-batch's loss parts (``dino_loss``, and ``ibot_loss`` / ``koleo_loss`` when on), unweighted,
    in one host read: call it at log points, where the loop syncs anyway."""
    parts = dino.loss_parts
    return dict(zip(parts, torch.stack([v.float() for v in parts.values()]).tolist())) if parts else {}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dino-train``; returns the exit status: 0 finished (or its --time_budget_min ran out), 1 stopped on
    a non-finite loss or a failed save, 2 a user error, 143 / 130 stopped by SIGTERM / SIGINT (saved)."""
    return run_program("dino-train", _main, argv)


def finish_run(args: argparse.Namespace, dino: Any, control: RunControl, total_steps: int, out: Path,
               config: dict[str, Any], data_path: Any, run_log: RunLog, evals: Any, hook: ReportHook,
               is_main: bool) -> None:
    """The end of a run that did not fail: the stop line, then (unless stopped by a signal) the final
    k-NN, the attention maps and the pictures on the main rank. ``dino``: the run's, or its
    :class:`WholeTeacher` (gathered here, on every rank)."""
    elapsed = time.time() - control.start
    gather(dino, not control.exit_code)
    if is_main:
        print(f"stopped at step {dino.step}/{total_steps}: {control.stop_reason or 'finished'} ({elapsed:.0f}s)"
              + (f"; checkpoint saved, exit status {control.exit_code}" if control.exit_code else ""), flush=True)
    if control.exit_code:
        run_log.finish([])
    elif is_main:
        if not args.no_final_knn:
            evals.final(out)
        maps = own_attention_maps(out, dino.teacher_backbone, config, args.attention_maps, evals)
        write_pictures(out, dino.teacher_backbone, config, maps, data_path, run_log,
                       hook=None if args.no_final_knn else hook)


def build_schedules(args: argparse.Namespace, total_steps: int, warmup_steps: int, world_size: int) -> DINOSchedules:
    """The official per-step lr (scaled by the global batch / 256), weight decay and momentum."""
    global_batch = args.batch_size_per_gpu * world_size * args.grad_accum_steps
    return DINOSchedules.official(
        total_steps, lr=args.lr * global_batch / 256.0, min_lr=args.min_lr, warmup_steps=warmup_steps,
        weight_decay=args.weight_decay, weight_decay_end=args.weight_decay_end,
        momentum_teacher=args.momentum_teacher, final_momentum=args.final_momentum_teacher)


def start_from_weights(dino: DINO, path: str, resume_path: Path, announce: bool) -> None:
    """dino-train's ``--pretrained_weights``: the student and teacher from ``path``
    (:func:`~dino_pytorch.pretrained.load_pretrained`: heads too when the file is a DINO checkpoint whose
    heads fit, RGB weights adapted to ``--in_chans``), one line saying what was loaded. Skipped when the
    run resumes from ``resume_path``, which holds everything. A file that does not fit is a user error."""
    if resume_path.exists():
        if announce:
            print(f"--pretrained_weights {path}: not loaded, the run resumes from {resume_path}", flush=True)
        return
    try:
        report = load_pretrained(dino, path)
    except CheckpointError as err:
        hint = (". Pass the flags of the file's architecture (--arch, --patch_size, --vit_depth, --vit_embed_dim, "
                "--num_register_tokens, --layerscale)") if isinstance(err, WeightsDoNotFit) else ""
        raise UsageError(f"--pretrained_weights {path}: {err}{hint}") from None
    if announce:
        print(report.summary(), flush=True)


def _main(argv: Optional[Sequence[str]]) -> int:
    # ---- config ----------------------------------------------------------------------------------
    args = get_args_parser().parse_args(argv)
    rank, world_size, device = init_distributed(args)
    teacher = distill_teacher_from_flags(args, announce=rank == 0)  # sets --out_dim before the checks use it
    resolve_defaults(args, device, announce=rank == 0)
    is_main = rank == 0
    out = output_dir(args.output_dir) if is_main else Path(args.output_dir)
    torch.manual_seed(args.seed)  # same init on every rank; augmentation is seeded per sample
    torch.backends.cudnn.benchmark = True

    # ---- data ------------------------------------------------------------------------------------
    source = open_train_data(args, announce=rank == 0)  # the files, --in_chans, --mean / --std (auto)
    config = config_from_flags(args, args.dataset, args.in_chans, args.global_crop_size)
    config["data"].update(source.config_entry())  # the statistics and value range the run normalises with
    data = build_data(args, source, rank, world_size)
    steps_per_epoch = epoch_steps(data.sampler.batches_per_epoch, args.grad_accum_steps)
    total_steps, epochs, warmup_steps = schedule_lengths(args, steps_per_epoch)

    # ---- DINO: the library's three-line path, and the optimizer ----------------------------------
    head = dict(out_dim=args.out_dim, use_bn=args.use_bn_in_head, norm_last_layer=args.norm_last_layer,
                hidden_dim=args.hidden_dim, bottleneck_dim=args.bottleneck_dim)
    dino = DINO(backbone_from_flags(config), **head, input_size=(args.in_chans,) + (args.global_crop_size,) * 2,
                teacher_temp=args.teacher_temp, warmup_teacher_temp=args.warmup_teacher_temp,
                warmup_teacher_temp_epochs=min(args.warmup_teacher_temp_epochs, epochs), nepochs=epochs,
                schedules=build_schedules(args, total_steps, warmup_steps, world_size),
                koleo_weight=args.koleo_weight, fused_head_loss=args.fused_head_loss, centering=args.centering,
                ibot=ibot_config(args), head_warmup_steps=args.head_warmup_steps,
                backbone_lr_scale=args.backbone_lr_scale, teacher=teacher, gram=gram_config(args)).to(device)
    config["head"] = dict(in_dim=dino.student.head.in_dim, nlayers=3, **head)
    if args.pretrained_weights:  # a resume restores everything from its own checkpoint instead
        start_from_weights(dino, args.pretrained_weights, out / ("checkpoint" if args.fsdp else "checkpoint.pth"),
                           is_main)
    if args.channels_last:
        dino.to(memory_format=torch.channels_last)  # 4-D weights of student and teacher
    distribute(dino, args, device, world_size, is_main)
    if args.compile:
        dino.compile_forwards()
    optimizer = build_optimizer(args.optimizer, dino.param_groups())
    scaler = grad_scaler(args.precision, device)

    # ---- resume ----------------------------------------------------------------------------------
    checkpointer = resume_or_start(out, dino, optimizer, scaler, device, args, config, is_main, total_steps)

    # ---- logging, the k-NN (the demo hangs its extras on it), the baselines at random init -------
    monitor = CollapseMonitor(args.out_dim, CollapseThresholds(warmup_steps=warmup_steps))  # says collapse once
    run_log = RunLog(out, is_main, args.tensorboard, monitor)
    hook = FashionMNISTDemo(config, run_log) if args.dataset == "fashion_mnist" else ReportHook()
    own = args.dataset != "fashion_mnist"
    view = WholeTeacher(dino, config, device, is_main) if args.fsdp and world_size > 1 else dino  # what evals read
    evals = (OwnDataKnn(args, cast(DINO, view), source, device, run_log, hook, is_main) if own
             else KnnEvals(args, cast(DINO, view), None, device, run_log, hook, is_main))
    if dino.step == 0:
        gather(view, bool(args.knn_every) or not args.no_final_knn)
        evals.at_random_init()
    if not args.no_progress:
        run_log.start_progress(total_steps, dino.step)

    # ---- training loop ---------------------------------------------------------------------------
    control = RunControl(args, world_size, device)  # SIGTERM / SIGINT, wall-clock saves, time budget
    loop = TrainLoop(args, dino, optimizer, scaler, data, rank, device, steps_per_epoch, total_steps, view)
    failure = loop.run(run_log, control, checkpointer, evals)
    data.replaced.finish()  # the count of undecodable files replaced, and the first few names
    if failure is not None:
        return run_log.fail(failure)
    run_log.close()
    control.close()

    # ---- final evaluation and pictures -----------------------------------------------------------
    finish_run(args, view, control, total_steps, out, config, source.path, run_log, evals, hook, is_main)
    if distributed.is_distributed():
        dist.barrier()
        dist.destroy_process_group()
    return control.exit_code


@dataclass
class TrainLoop:
    """dino-train's loop over the run's fixed parts, in the official order: per-step lr / wd /
    momentum, micro-batches, per-parameter clip, last-layer freeze, optimizer step, EMA."""

    args: argparse.Namespace
    dino: DINO
    optimizer: torch.optim.Optimizer
    scaler: Any
    data: TrainData
    rank: int
    device: torch.device
    steps_per_epoch: int
    total_steps: int
    view: Any = None  # what the evaluations read: ``dino``, or its WholeTeacher under --fsdp

    def run(self, run_log: RunLog, control: RunControl, checkpointer: Checkpointer, evals: KnnEvals) -> Optional[str]:
        """Train from ``dino.step`` to ``total_steps``, or until ``control`` stops the run (saved);
        returns None, or the one line the run fails with (a non-finite step, a failed save)."""
        args, dino = self.args, self.dino
        batches: Optional[Iterator[Any]] = None
        epoch_loss_sum, epoch_loss_count = torch.zeros((), device=self.device), 0
        dino.train()
        while dino.step < self.total_steps:
            step, epoch = dino.step, dino.step // self.steps_per_epoch
            if batches is None or step % self.steps_per_epoch == 0:
                self.data.sampler.set_epoch(epoch, start_batch=(step % self.steps_per_epoch) * args.grad_accum_steps)
                batches = iter(self.data.loader)
            values = dino.apply_schedules(self.optimizer)
            loss = self.step(batches, step, epoch, epoch_loss_sum)
            epoch_loss_count += 1
            momentum = dino.update_teacher()
            step += 1
            log_point = step % args.log_every == 0 or step == self.total_steps
            if (self.device.type == "cpu" or log_point) and (report := dino.nonfinite_report()) is not None:
                return checkpointer.diverged(report)  # read where the host syncs anyway
            if log_point:
                loss_value = loss.item() * args.grad_accum_steps  # the only per-log host sync
                run_log.step({"step": step, "epoch": epoch, "train_loss": loss_value, "lr": values["lr"],
                              "wd": values["weight_decay"], "momentum": momentum,
                              "teacher_temp": dino.criterion.teacher_temp_at(epoch), **loss_parts(dino),
                              **{k: v.item() for k, v in dino.collapse_metrics().items()}})
                self.data.replaced.log_point()  # a line when undecodable files were replaced since the last one
            run_log.advance()
            if step < self.total_steps:
                gather(self.view, bool(args.knn_every) and step % args.knn_every == 0)
                evals.periodic(step)

            end_of_epoch = step % self.steps_per_epoch == 0
            periodic = bool(args.save_every_steps) and step % args.save_every_steps == 0
            if control.poll(step) or end_of_epoch or step == self.total_steps or periodic:
                if (report := dino.nonfinite_report()) is not None:  # never save after a non-finite step
                    return checkpointer.diverged(report)
                epoch_mean = (epoch_loss_sum / max(epoch_loss_count, 1)).item()  # mean of per-step losses
                failure = checkpointer.save(epoch + 1 if end_of_epoch else epoch)
                control.saved()
                if end_of_epoch:
                    run_log.epoch({"train_loss": epoch_mean, "train_lr": values["lr"],
                                   "train_wd": values["weight_decay"], "epoch": epoch})  # official log.txt line
                    if args.saveckp_freq and epoch % args.saveckp_freq == 0 and not failure:
                        failure = checkpointer.save(epoch + 1, checkpointer.path.with_name(f"checkpoint{epoch:04}.pth"))
                    epoch_loss_sum.zero_()
                    epoch_loss_count = 0
                if failure:
                    return failure
            if control.stop_reason:
                break
        return None

    def step(self, batches: Iterator[Any], step: int, epoch: int, loss_sum: torch.Tensor) -> torch.Tensor:
        """One optimizer step over ``--grad_accum_steps`` micro-batches of ``batches``. Adds each
        micro-batch's loss to ``loss_sum`` (on the device: no host sync); returns the last one's,
        divided by ``--grad_accum_steps`` as it was backpropagated."""
        args, dino = self.args, self.dino
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(args.grad_accum_steps):
            images, _, keys, *replaced = next(batches)  # keys: the samples' global indices, epoch * N + index
            self.data.replaced.add(replaced)  # own data: the undecodable files these items stood in for
            views, gram_views = split_views(make_views(images, self.data.augment_on_device, args, step, micro,
                                                       self.rank, self.device, keys=keys), args)
            torch.manual_seed(model_seed(args.seed, step, micro, self.rank))  # drop path: no RNG history
            with dino.no_sync(micro < args.grad_accum_steps - 1), autocast(args.precision, self.device):
                loss = dino(views, epoch, gram_views=gram_views) / args.grad_accum_steps
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += loss.detach()
        # The official first-epochs freeze of the prototypes, counted from the end of a head warm-up.
        optimizer_step(dino, self.optimizer, self.scaler, args.clip_grad,
                       freeze_last_layer=dino.last_layer_frozen(args.freeze_last_layer * self.steps_per_epoch))
        return loss


if __name__ == "__main__":
    sys.exit(main())
