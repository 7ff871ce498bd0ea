"""dino-train's checkpoint: ``output_dir/checkpoint.pth``, written by :class:`Checkpointer` and read
back by :func:`resume_or_start`, which refuses in one line a file that would not continue the run
(unreadable, non-finite, or saved under other schedules). With ``--fsdp`` it is the folder
``output_dir/checkpoint`` (:class:`ShardedCheckpointer`, torch.distributed.checkpoint), which every
rank writes and any number of ranks resumes, the global batch kept."""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from .. import distributed
from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..dino import DINO
from ..sharded_checkpoint import (
    load_sharded_checkpoint,
    read_meta,
    remove_stale,
    resolve_checkpoint_dir,
    save_sharded_checkpoint,
)
from ._setup import UsageError
from .train_flags import check_resume_fits

# The flags that define the schedules (lr, weight decay, momentum, teacher temperature, last-layer
# freeze) and the data position of a step: a resume must not change them silently.
SCHEDULE_FLAGS = ("max_steps", "epochs", "warmup_steps", "warmup_epochs", "lr", "min_lr", "weight_decay",
                  "weight_decay_end", "momentum_teacher", "teacher_temp", "warmup_teacher_temp",
                  "warmup_teacher_temp_epochs", "freeze_last_layer", "batch_size_per_gpu", "grad_accum_steps",
                  "head_warmup_steps", "backbone_lr_scale", "final_momentum_teacher")
STALE_TEMP_GLOB = ".checkpoint*.pth.tmp-*"  # save_checkpoint's temporary files, left by a kill mid-save


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
    check_same_ibot(ckpt, dino, path)
    check_same_gram(ckpt, dino, path)
    check_same_teacher(ckpt, dino, path, getattr(args, "distill_from", None))
    for entry in ("student", "teacher", "dino_loss", "ibot_loss", "gram_teacher", "optimizer", "fp16_scaler"):
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
    if "rng_cpu" in ckpt:  # dino-export's file has none: every draw of a step is seeded by its position anyway
        torch.set_rng_state(ckpt["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in ckpt:
        torch.cuda.set_rng_state(ckpt["rng_cuda"], device)


def _check_same_part(ckpt: Mapping[str, Any], path: Path, entry: str, part: str, flag: str,
                     now: Optional[str], off: str = "0") -> None:
    """``part`` on in both runs or in neither: the checkpoint holds ``entry`` only with it; ``now`` is
    this run's value of ``--flag`` (None: off, the flag's value ``off``, or absent when empty)."""
    if (entry in ckpt) == (now is not None):
        return
    saved = (ckpt.get("args") or {}).get(flag)
    then = f"with {part} (--{flag} {saved})" if entry in ckpt else f"without {part}"
    has = f"--{flag} {now}" if now is not None else (f"--{flag} {off}" if off else f"no --{flag}")
    raise UsageError(f"cannot resume from {path}: it was trained {then}, and this run has {has}. "
                     "Pass the flags it was trained with, or another --output_dir (or move the file away) to "
                     "start afresh")


def check_same_ibot(ckpt: Mapping[str, Any], dino: DINO, path: Path) -> None:
    """iBOT on in both runs or in neither (the iBOT centre, ``ibot_loss``, is saved only with it): with a
    shared patch head the networks alone would not tell."""
    _check_same_part(ckpt, path, "ibot_loss", "iBOT", "ibot_weight",
                     None if dino.ibot is None else str(dino.ibot.weight))


def check_same_gram(ckpt: Mapping[str, Any], dino: DINO, path: Path) -> None:
    """Gram anchoring on in both runs or in neither (its snapshot, ``gram_teacher``, is saved only with it)."""
    _check_same_part(ckpt, path, "gram_teacher", "Gram anchoring", "gram_weight",
                     None if dino.gram is None else "> 0")


def check_same_teacher(ckpt: Mapping[str, Any], dino: DINO, path: Path, distill_from: Optional[str]) -> None:
    """A distilled run resumes from the teacher it was distilled from, compared by fingerprint (the
    file may have moved), and a plain run stays plain. A distilled file from before fingerprints were
    saved is taken as it is."""
    teacher, saved = dino.distill_teacher, ckpt.get("distill_teacher_fingerprint")
    if saved is None and teacher is not None and (ckpt.get("args") or {}).get("distill_from"):
        return
    _check_same_part(ckpt, path, "distill_teacher_fingerprint", "distillation", "distill_from", distill_from,
                     off="")
    if teacher is not None and saved is not None and saved != teacher.fingerprint():
        then = (ckpt.get("args") or {}).get("distill_from")
        raise UsageError(f"cannot resume from {path}: it was distilled from another teacher (--distill_from "
                         f"{then}, whose weights differ from those of --distill_from {distill_from}). Pass that "
                         "teacher, or another --output_dir to start afresh")


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
            return self.failed(path, err.strerror or str(err))
        if path == self.path:
            self.saved_step = self.dino.step
        return None

    def failed(self, path: Path, why: str) -> str:
        """The one line a failed save stops the run with, saying what is kept."""
        kept = (f"The checkpoint of step {self.saved_step} at {self.path} is intact" if self.saved_step is not None
                else "No checkpoint was written yet")
        return f"cannot write {path} at step {self.dino.step}: {why}; stopping. {kept}"

    def diverged(self, report: str) -> str:
        """The one line a run stopped by a non-finite step ends with: what, where, and what is kept."""
        kept = (f"the last good checkpoint is {self.path} (step {self.saved_step})" if self.saved_step is not None
                else "there is no last good checkpoint: none was written before it")
        return f"{report}; stopping without saving after it: {kept}"


class ShardedCheckpointer(Checkpointer):
    """``--fsdp``: every rank writes its shards into the folder ``output_dir/checkpoint`` (atomically,
    :func:`~dino_pytorch.sharded_checkpoint.save_sharded_checkpoint`), with the run's configuration
    in its ``dino.json``. No RNG state: every draw of a step is seeded by its position."""

    def save(self, epoch: int, path: Optional[Path] = None) -> Optional[str]:
        path = self.path if path is None else path.with_suffix("")  # --saveckp_freq: checkpoint0003/
        try:
            save_sharded_checkpoint(path, self.dino, self.optimizer, epoch=epoch, args=vars(self.args),
                                    model_config=self.config, total_steps=self.total_steps)
        except (OSError, CheckpointException) as err:  # DCP raises a failed write on every rank
            return self.failed(path, (err.strerror if isinstance(err, OSError) else None) or str(err).split("\n")[0])
        if path == self.path:
            self.saved_step = self.dino.step
        return None


def resume_sharded(path: Path, dino: DINO, optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                   total_steps: int, world_size: int) -> None:
    """Restore the run saved in the folder ``path`` on any number of ranks (DCP reshards). Its schedules
    must be this run's, the global batch (``--batch_size_per_gpu`` x ranks x ``--grad_accum_steps``)
    included, rather than the per-rank one, unless ``--allow_schedule_change``."""
    try:
        meta = read_meta(path)
    except CheckpointError as err:
        raise UsageError(f"cannot resume: {err}. Move the folder away to start afresh.") from None
    saved = dict(meta.get("args") or {})
    per_rank = ("batch_size_per_gpu", "grad_accum_steps")
    change = None
    if all(name in saved for name in per_rank):
        then = saved.pop("batch_size_per_gpu") * int(meta.get("world_size", 1)) * saved.pop("grad_accum_steps")
        now = args.batch_size_per_gpu * world_size * args.grad_accum_steps
        if then != now:
            change = (f"the global batch (--batch_size_per_gpu x {world_size} ranks x --grad_accum_steps) is {now} "
                      f"here but {then} in the checkpoint's run on {meta.get('world_size', 1)} rank(s)")
    change = change or schedule_change(saved, args, meta.get("total_steps"), total_steps)
    if change is not None and not args.allow_schedule_change:
        raise UsageError(f"cannot resume from {path}: {change}, which would change its schedules mid-run; "
                         "pass --allow_schedule_change to resume with the new ones")
    try:
        load_sharded_checkpoint(path, dino, optimizer)
    except CheckpointError as err:
        raise UsageError(f"cannot resume from {path}: {err}") from None


def _check_one_kind(out: Path, sharded: bool) -> None:
    """A run resumes from the kind of checkpoint it writes: refuse the other kind in one line."""
    if sharded and (out / "checkpoint.pth").exists() and not (out / "checkpoint").exists():
        raise UsageError(f"--fsdp: {out} holds checkpoint.pth of a run without --fsdp; resume it without --fsdp, "
                         "or pass another --output_dir")
    if not sharded and (out / "checkpoint").is_dir() and not (out / "checkpoint.pth").exists():
        raise UsageError(f"{out} holds the checkpoint folder of a --fsdp run: pass --fsdp (on any number of "
                         f"ranks), or write checkpoint.pth from it with dino-export {out / 'checkpoint'} "
                         f"{out / 'checkpoint.pth'}")


def resume_or_start(out: Path, dino: DINO, optimizer: torch.optim.Optimizer, scaler: Any, device: torch.device,
                    args: argparse.Namespace, config: dict[str, Any], is_main: bool, total_steps: int) -> Checkpointer:
    """Resume from ``out/checkpoint.pth`` (``--fsdp``: the folder ``out/checkpoint``) when it exists
    (:func:`resume`, :func:`resume_sharded`), after deleting the temporary files of interrupted saves;
    returns the run's :class:`Checkpointer`."""
    sharded = bool(getattr(args, "fsdp", False))
    path = out / ("checkpoint" if sharded else "checkpoint.pth")
    if is_main:
        if sharded and not path.exists():
            with contextlib.suppress(CheckpointError):  # a save killed between its two renames: the old folder back
                resolve_checkpoint_dir(path)
        stale = remove_stale_temp_files(out) + (remove_stale(path) if sharded else [])
        if stale:
            print(f"removed {len(stale)} temporary file(s) of interrupted saves: {', '.join(stale)}", flush=True)
    if distributed.is_distributed():
        dist.barrier()  # no rank looks for the checkpoint while rank 0 tidies
    _check_one_kind(out, sharded)
    if path.exists() and sharded:
        resume_sharded(path, dino, optimizer, args, total_steps, distributed.get_world_size())
    elif path.exists():
        resume(path, dino, optimizer, scaler, device, args, total_steps)
    if path.exists() and is_main:
        print(f"resumed from {path} at step {dino.step}", flush=True)
    kind = ShardedCheckpointer if sharded else Checkpointer
    return kind(path, dino, optimizer, scaler, args, config, device, is_main, total_steps)
