"""dino-train's flags: every official ``main_dino.py`` flag with its name and default, ours after
them, and the checks argparse cannot express, in the user's names (one-line errors, exit 2)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed
from ..ibot import IBOTConfig
from ..precision import PRECISION_REQUESTS, native_precision, resolve_precision, support_note
from ._setup import (
    DINOV2_PREFIX,
    UsageError,
    add_debug_flag,
    add_model_args,
    bool_flag,
    check_flags,
    image_channels,
)
from .train_gram import GRAM_FLAG_RULES, add_gram_args, check_gram_flags
from .train_resolution import RESOLUTION_FLAG_RULES, add_resolution_args, check_resolution_flags

DESCRIPTION = """Train DINO: the library's three-line DINO plus a loop.

    dino-train --dataset fashion_mnist --arch convnet --output_dir runs/fmnist
    torchrun --nproc_per_node=2 -m dino_pytorch.train ...          # DDP (gloo on CPU, nccl on CUDA)

Every official main_dino.py flag keeps its name and default. The run resumes from
output_dir/checkpoint.pth; checkpoints record the model configuration."""

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("dino-train", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- official flags, official defaults ---
    add_model_args(p, training=True)
    p.add_argument("--out_dim", default=None, type=int, help="prototypes (default: 65536, or the --distill_from "
                   "teacher's)")
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
    p.add_argument("--dataset", default="imagefolder", choices=["imagefolder", "fashion_mnist"],
                   help="imagefolder: any folder tree of images or band files (--data_path) or a file list "
                        "(--file_list), labelled by class subfolders or not (docs/own-data.md)")
    add_data_args(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--precision", default=None, choices=PRECISION_REQUESTS,
                   help="default: fp16 when --use_fp16 and on CUDA, else fp32. auto: bf16 where the device "
                        "does it natively (a CPU with AMX, an Ampere or later GPU), else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the student and teacher")
    p.add_argument("--channels_last", action="store_true",
                   help="NHWC conv weights and views (oneDNN's faster CPU kernels); measured on the "
                        "Fashion-MNIST ConvNet: 0.45 -> 0.37 s per step, 0.30 s with --precision bf16")
    add_loop_args(p)
    p.add_argument("--augment", default=None, choices=["per_image", "batched"],
                   help="per_image: MultiCropTransform in the workers (official); batched: BatchedMultiCrop "
                        "on the device. Default: batched for fashion_mnist, per_image otherwise")
    p.add_argument("--global_crop_size", default=None, type=int, help="default 224 (28 for fashion_mnist)")
    p.add_argument("--local_crop_size", default=None, type=int, help="default 96 (16 for fashion_mnist)")
    add_head_args(p)
    p.add_argument("--attention_maps", default=4, type=int, help="ViT only: attention PNGs of N test images at the end")
    p.add_argument("--no_progress", action="store_true", help="plain log lines instead of a tqdm bar")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write metrics.jsonl's scalars, curves.png and the attention maps to "
                        "output_dir/tensorboard (needs the tensorboard extra)")
    p.add_argument("--save_every_min", default=10.0, type=float,
                   help="also checkpoint when this many minutes have passed since the last save (0: off)")
    p.add_argument("--allow_schedule_change", action="store_true",
                   help="resume even if the flags that define the schedules differ from the checkpoint's")
    add_dinov2_args(p)
    add_gram_args(p)
    add_resolution_args(p)
    add_weights_args(p)
    add_scale_args(p)
    add_debug_flag(p)
    return p


def add_loop_args(p: argparse.ArgumentParser) -> None:
    """The loop's length, evaluations and saves (ours, not official)."""
    p.add_argument("--grad_accum_steps", default=1, type=int)
    p.add_argument("--max_steps", default=None, type=int,
                   help="total optimizer steps; the schedules then span exactly these steps")
    p.add_argument("--warmup_steps", default=None, type=int,
                   help="linear lr warm-up in steps (overrides --warmup_epochs)")
    p.add_argument("--time_budget_min", default=None, type=float, help="stop (and checkpoint) after this long")
    p.add_argument("--knn_every", default=0, type=int, help="k-NN evaluation every N steps (0: only at the end)")
    p.add_argument("--knn_train_subset", default=None, type=int, help="periodic k-NN on the first N train images")
    p.add_argument("--knn_test_subset", default=None, type=int, help="periodic k-NN on the first N test images")
    p.add_argument("--no_final_knn", action="store_true")
    p.add_argument("--log_every", default=10, type=int)
    p.add_argument("--save_every_steps", default=0, type=int, help="also checkpoint every N steps")


def add_scale_args(p: argparse.ArgumentParser) -> None:
    """Models beyond one GPU's memory (docs/training.md): FSDP2 sharding, activation checkpointing."""
    g = p.add_argument_group("big models (docs/training.md)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the student, the teacher, the gradients and the optimizer state over the ranks "
                        "(FSDP2, one unit per transformer block) instead of replicating them (DDP); on CUDA with "
                        "--precision bf16 (the default with --fsdp there): bf16 parameters, fp32 gradient "
                        "reduction. Checkpoints are the folder output_dir/checkpoint, resumable on any number of "
                        "ranks (the global batch kept); dino-export writes the official single file")
    g.add_argument("--activation_checkpointing", action="store_true",
                   help="keep each block's input only and recompute its inside in the backward: about one more "
                        "forward of compute for a fraction of the activation memory (with or without --fsdp)")


def check_fsdp_flags(args: argparse.Namespace) -> None:
    """Before ``--precision`` is settled: what ``--fsdp`` cannot run (the fused head loss; fp16, whose
    gradient scaler FSDP does not shard)."""
    if args.fsdp and args.fused_head_loss:
        raise UsageError("--fused_head_loss true with --fsdp: the fused loss reads the head's last layer outside "
                         "its forward, where FSDP holds only shards; expected --fused_head_loss false")
    if args.fsdp and args.precision == "fp16":
        raise UsageError("--precision fp16 with --fsdp: expected bf16 (bf16 parameters, fp32 gradient "
                         "reduction) or fp32; fp16 needs a gradient scaler over sharded gradients")


def fsdp_precision(args: argparse.Namespace, announce: bool) -> None:
    """After ``--precision`` is settled: ``--fsdp`` runs bf16 where the official default is fp16 (CUDA)."""
    if args.fsdp and args.precision == "fp16":
        args.precision = "bf16"
        if announce:
            print("--fsdp: precision bf16 (bf16 parameters, fp32 gradient reduction) instead of the official "
                  "fp16 of --use_fp16", flush=True)


def add_head_args(p: argparse.ArgumentParser) -> None:
    """The head's widths beyond the official flags, and the fused head loss."""
    p.add_argument("--hidden_dim", default=2048, type=int)
    p.add_argument("--bottleneck_dim", default=256, type=int)
    p.add_argument("--fused_head_loss", default=False, type=bool_flag,
                   help="apply the head's last layer inside the loss, block by block: the (views*B, out_dim) student "
                        "logits never exist at once (~0.16x the peak memory of head + loss at out_dim 65536)")


def add_weights_args(p: argparse.ArgumentParser) -> None:
    """Starting from weights (docs/own-data.md): the file, the head warm-up, the backbone's lr."""
    g = p.add_argument_group("starting from weights (docs/own-data.md)")
    g.add_argument("--pretrained_weights", default=None, type=str, metavar="FILE",
                   help="initialise student and teacher from an official DINO checkpoint or backbone, a DINOv2 "
                        "file, a torchvision / timm state_dict or a dino-train checkpoint (heads too when it has "
                        "fitting ones); RGB weights are adapted to the model's channels; ignored on a resume")
    g.add_argument("--distill_from", default=None, type=str, metavar="CHECKPOINT",
                   help="distil from this dino-train checkpoint's teacher, frozen (DINOv3): it gives the targets, "
                        "the student (--arch, any size) matches its prototype counts, and the saved and evaluated "
                        "network is the EMA of the student (docs/dinov3.md)")
    g.add_argument("--head_warmup_steps", default=0, type=int, metavar="N",
                   help="freeze the backbone for the first N steps while the heads learn (fresh heads would "
                        "otherwise wreck pretrained weights); --freeze_last_layer counts from its end")
    g.add_argument("--backbone_lr_scale", default=1.0, type=float, metavar="F",
                   help="the backbone's lr is the scheduled lr times F (e.g. 0.1 to move pretrained weights "
                        "gently)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Own data (docs/own-data.md): a file list, the model's channels, the statistics, band value ranges."""
    p.add_argument("--file_list", default=None, metavar="FILE",
                   help="one image path a line (relative to the list's folder; 'path<TAB>class' for labels), "
                        "instead of walking --data_path")
    p.add_argument("--in_chans", default=None, type=int,
                   help="model input channels, checked against the data (default: the data's; photos 3, "
                        "fashion_mnist 1; 1 or 3 for photos and fashion_mnist)")
    p.add_argument("--mean", default=None, nargs="+", metavar="auto|M",
                   help="per-channel normalisation mean, or auto: measured on 1,000 sampled images (default: "
                        "ImageNet's for RGB photos, Fashion-MNIST's for it, auto for other data)")
    p.add_argument("--std", default=None, nargs="+", metavar="auto|S", help="per-channel std, or auto (as --mean)")
    p.add_argument("--value_range", default=None, type=float, nargs="+", metavar="LOW HIGH",
                   help="band files: values mapped from [LOW, HIGH] to [0, 1] (one pair, or one per band); "
                        "default: the dtype's range for integers, measured on the sample for floats")


def add_dinov2_args(p: argparse.ArgumentParser) -> None:
    """DINOv2's recipe on dino-train: the iBOT loss, Sinkhorn-Knopp, a DINOv2 ViT's registers and layer-scale."""
    g = p.add_argument_group("DINOv2 recipe (docs/dinov2.md; iBOT needs a dinov2_vit_* arch)")
    g.add_argument("--ibot_weight", default=0.0, type=float,
                   help="weight of DINOv2's masked-patch iBOT loss in the total (0: off; DINOv2: 1.0)")
    g.add_argument("--ibot_head", default=None, choices=["separate", "shared"],
                   help="iBOT's patch head: separate (its own, DINOv2's default) or shared (the DINO head)")
    g.add_argument("--ibot_out_dim", default=None, type=int,
                   help="prototypes of a separate patch head (default: --out_dim)")
    g.add_argument("--mask_probability", default=None, type=float,
                   help="share of the global crops that get a block mask (default 0.5, DINOv2's)")
    g.add_argument("--mask_ratio", default=None, type=float, nargs="+", metavar="RATIO",
                   help="LOW HIGH: share of a masked crop's patches, spread over [LOW, HIGH] (default 0.1 0.5)")
    g.add_argument("--koleo_weight", default=0.0, type=float,
                   help="DINOv2's KoLeo regulariser on each global view's student features (0: off; DINOv2: 0.1)")
    g.add_argument("--centering", default="centering", choices=["centering", "sinkhorn_knopp"],
                   help="the teachers' targets, DINO's and iBOT's: the EMA centre (DINO) or Sinkhorn-Knopp (DINOv2)")
    g.add_argument("--num_register_tokens", default=0, type=int,
                   help="dinov2_vit_*: register tokens (DINOv2's _reg models: 4)")
    g.add_argument("--layerscale", default=None, type=float,
                   help="dinov2_vit_*: layer-scale start value (DINOv2 trains with 1e-5; default: no layer-scale)")


FLAG_RULES = dict(
    patch_size="int>=1", vit_depth="int>=1", vit_embed_dim="int>=1", width="int>=1", pool="int>=1",
    out_dim="int>=1", hidden_dim="int>=1", bottleneck_dim="int>=1", batch_size_per_gpu="int>=1", epochs="int>=1",
    grad_accum_steps="int>=1", log_every="int>=1", max_steps="int>=1", global_crop_size="int>=1",
    local_crop_size="int>=1", knn_train_subset="int>=1", knn_test_subset="int>=1",
    warmup_teacher_temp_epochs="int>=0", freeze_last_layer="int>=0", warmup_epochs="int>=0",
    local_crops_number="int>=0", saveckp_freq="int>=0", num_workers="int>=0", warmup_steps="int>=0",
    knn_every="int>=0", save_every_steps="int>=0", attention_maps="int>=0",
    lr=">0", warmup_teacher_temp=">0", teacher_temp=">0", time_budget_min=">0",
    min_lr=">=0", save_every_min=">=0", weight_decay=">=0", weight_decay_end=">=0", clip_grad=">=0", koleo_weight=">=0",
    momentum_teacher="[0,1]", drop_path_rate="[0,1)", global_crops_scale="(0,1]", local_crops_scale="(0,1]",
    output_dir="outdir", ibot_weight=">=0", ibot_out_dim="int>=1", mask_probability="[0,1]", mask_ratio="[0,1]",
    num_register_tokens="int>=0", layerscale=">0", in_chans="int>=1", file_list="file",
    pretrained_weights="file", distill_from="file", head_warmup_steps="int>=0", backbone_lr_scale=">=0",
)
IBOT_ONLY_FLAGS = ("ibot_head", "ibot_out_dim", "mask_probability", "mask_ratio")


def resolve_defaults(args: argparse.Namespace, device: torch.device, announce: bool = True) -> None:
    """Dataset-dependent defaults, and every check of the flags' values, in the user's names, before
    any work starts (one-line errors, exit 2). ``announce``: print :func:`settle_precision`'s lines."""
    small = args.dataset == "fashion_mnist"
    if small and args.file_list:
        raise UsageError(f"--file_list {args.file_list!r} with --dataset fashion_mnist: expected one or the other")
    check_flags(args, **FLAG_RULES, **GRAM_FLAG_RULES, **RESOLUTION_FLAG_RULES,
                **({} if small or args.file_list else {"data_path": "dir"}))
    args.global_crop_size = args.global_crop_size or (28 if small else 224)
    args.local_crop_size = args.local_crop_size or (16 if small else 96)
    args.augment = args.augment or ("batched" if small else "per_image")
    check_fsdp_flags(args)
    settle_precision(args, device, "dino-train", announce)
    fsdp_precision(args, announce)
    for name in ("global_crops_scale", "local_crops_scale"):
        value = tuple(getattr(args, name))
        if len(value) != 2 or value[0] > value[1]:
            raise UsageError(f"--{name} {' '.join(map(str, value))}: expected two numbers (min max), min <= max")
        setattr(args, name, value)
    if args.augment == "batched" and not small:
        raise UsageError("--augment batched needs equal-size uint8 images: use it with --dataset fashion_mnist")
    check_dinov2_flags(args)
    check_resolution_flags(args)  # before the Gram defaults: it names a --gram_teacher_scale given
    check_gram_flags(args)
    if small and args.in_chans is None:  # the data's default; own data: read off the files later
        args.in_chans = image_channels(args.dataset, args.arch)
    # args.in_chans is checked against the data by train_sources.open_train_data.


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_dinov2_flags(args: argparse.Namespace) -> None:
    """The DINOv2 flags against the arch and each other (one line naming the flag and its value), then
    the iBOT defaults filled in (None until here, so a flag given without iBOT is named)."""
    dinov2 = args.arch.startswith(DINOV2_PREFIX)
    if args.ibot_weight > 0 and not dinov2:
        raise UsageError(f"--ibot_weight {args.ibot_weight}: iBOT needs a dinov2_vit_* arch (dinov2_vit_small, "
                         f"_base, _large: masked patch tokens), not --arch {args.arch}")
    for name in ("num_register_tokens", "layerscale"):
        if getattr(args, name) and not dinov2:
            raise UsageError(f"--{name} {getattr(args, name)}: only the dinov2_vit_* archs have it, "
                             f"not --arch {args.arch}")
    given = next((name for name in IBOT_ONLY_FLAGS if getattr(args, name) is not None), None)
    if args.ibot_weight == 0 and given is not None:
        raise UsageError(f"--{given} {_shown(getattr(args, given))}: an iBOT option, and iBOT is off; "
                         "pass --ibot_weight > 0 (DINOv2: 1) to turn it on")
    if args.ibot_weight > 0 and args.fused_head_loss:
        raise UsageError(f"--fused_head_loss {args.fused_head_loss} with --ibot_weight {args.ibot_weight}: the fused "
                         "head loss covers the DINO loss only; expected one or the other")
    ratio = args.mask_ratio
    if ratio is not None and (len(ratio) != 2 or ratio[0] > ratio[1]):
        raise UsageError(f"--mask_ratio {_shown(ratio)}: expected two numbers (low high), low <= high")
    if args.ibot_head == "shared" and args.ibot_out_dim not in (None, args.out_dim):
        raise UsageError(f"--ibot_out_dim {args.ibot_out_dim} with --ibot_head shared: the shared head has "
                         f"--out_dim {args.out_dim} prototypes; drop --ibot_out_dim or use --ibot_head separate")
    if dinov2:  # the high-resolution stage checks its own local sizes (--local_crop_sizes)
        for name in ("global_crop_size",) + (("local_crop_size",) if args.local_crop_sizes is None else ()):
            if getattr(args, name) % args.patch_size:
                raise UsageError(f"--{name} {getattr(args, name)}: not a multiple of --patch_size {args.patch_size}; "
                                 f"{args.arch} takes whole patches")
    args.ibot_head = args.ibot_head or "separate"
    args.mask_probability = 0.5 if args.mask_probability is None else args.mask_probability
    args.mask_ratio = (0.1, 0.5) if args.mask_ratio is None else tuple(args.mask_ratio)


def ibot_config(args: argparse.Namespace) -> Optional[IBOTConfig]:
    """The iBOT part of DINO the flags ask for (None: --ibot_weight 0); its masks are seeded by --seed."""
    if args.ibot_weight == 0:
        return None
    return IBOTConfig(weight=args.ibot_weight, head=args.ibot_head, mask_probability=args.mask_probability,
                      mask_ratio=args.mask_ratio, out_dim=args.ibot_out_dim, seed=args.seed)


def settle_precision(args: argparse.Namespace, device: torch.device, prog: str, announce: bool = True) -> None:
    """``--precision`` resolved once, at start-up, into ``args.precision`` (what autocast runs).

    None (not given): the official default, fp16 with ``--use_fp16`` on CUDA, else fp32. ``auto``:
    bf16 where ``device`` does it natively, else fp32, said in one line. An explicit bf16 or fp16
    that the CPU or GPU does not do natively costs one warning line on stderr. ``announce``: print
    (rank 0). ``args.precision_requested`` keeps what was asked, so a checkpoint's ``args`` hold
    both, and a resume with ``auto`` resolves afresh on its own machine.
    """
    requested = args.precision_requested = args.precision
    if requested is None:
        args.precision = "fp16" if args.use_fp16 and device.type == "cuda" else "fp32"
    elif requested == "auto":
        args.precision = resolve_precision("auto", device)
        if distributed.is_distributed():
            # A timed probe decides on a CPU: every rank runs what rank 0 measured.
            agreed = [args.precision]
            dist.broadcast_object_list(agreed, src=0)
            args.precision = agreed[0]
        if announce:
            print(f"precision auto -> {args.precision} ({support_note('bf16', device)})", flush=True)
    elif requested != "fp32" and device.type in ("cpu", "cuda") and not native_precision(requested, device):
        if announce:
            print(f"{prog}: warning: --precision {requested}: {support_note(requested, device)}; it can be several "
                  f"times slower than fp32, and --precision auto picks {resolve_precision('auto', device)} here",
                  file=sys.stderr, flush=True)


def check_resume_fits(checkpoint: Mapping[str, Any], student: nn.Module, path: Path) -> None:
    """Resume only into the network the checkpoint holds: another width, depth or head is a
    one-line user error naming the mismatch and what to do."""
    from ..checkpoint import CheckpointError, check_fit, strip_prefixes
    from ..checkpoint import _unwrap as unwrap
    from ..model_config import read_model_config

    state = checkpoint.get("student")
    if not isinstance(state, Mapping):
        raise UsageError(f"cannot resume from {path}: it holds no 'student' state dict. Move the file away to start "
                         "afresh")
    try:
        check_fit(unwrap(student), strip_prefixes(state, ("module.",)), "student", str(path))
    except CheckpointError as err:
        stored = read_model_config(checkpoint, str(path))
        trained = (f" It was trained as {stored['arch']} {stored['backbone_kwargs']}, head {stored['head']}."
                   if stored else "")
        raise UsageError(f"cannot resume: {err}.{trained} Pass the flags it was trained with, or another "
                         "--output_dir (or move the file away) to start afresh") from None
