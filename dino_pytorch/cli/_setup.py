"""What every program shares: one-line errors, flags, device, the backbone (from flags or from a
checkpoint's stored configuration), image channels, datasets, and k-NN on a dataset.

The library never imports this module; each program is a short ``main`` over these helpers.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..checkpoint import CheckpointError, load_into, read_checkpoint
from ..model_config import build_backbone, make_model_config, read_model_config

VIT_PREFIX = "vit_"
DINOV2_PREFIX = "dinov2_vit_"  # DINOv2's ViTs (registers, layer-scale, a mask token): the ones iBOT can train
DEBUG_ENV = "DINO_PYTORCH_DEBUG"
TRUST_HELP = ("only for a file you made yourself that pickles other Python objects: unpickle it with "
              "weights_only=False, which runs any code it holds. Official checkpoints need no flag")


class UsageError(Exception):
    """A user error: printed as one line ``<prog>: error: <message>``, exit status 2."""


def run_program(prog: str, main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]]) -> Any:
    """Run ``main(argv)``; user errors end in one line on stderr and exit 2 (a traceback too only
    with ``--debug`` or ``DINO_PYTORCH_DEBUG=1``)."""
    try:
        return main(argv)
    except (UsageError, CheckpointError, FileNotFoundError) as err:
        if os.environ.get(DEBUG_ENV) == "1" or "--debug" in (sys.argv[1:] if argv is None else list(argv)):
            traceback.print_exc()
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"on a user error, also print the Python traceback (as {DEBUG_ENV}=1)")


@contextlib.contextmanager
def setup_phase() -> Iterator[None]:
    """Set-up from flag values (models, data): a ValueError or TypeError the library raises on a
    value becomes a one-line user error. Only around set-up, never around training, where such an
    error is a bug and keeps its traceback."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from err


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int>=1": (lambda v: v >= 1, "a positive int"),
    "int>=0": (lambda v: v >= 0, "an int >= 0"),
    ">0": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ">=0": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "<=1": (lambda v: math.isfinite(v) and v <= 1, "a finite number <= 1"),
    "[0,1]": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "[0,1)": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "(0,1]": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
}


def _check_path(name: str, path: str, rule: str) -> None:
    shown = f"--{name} {path!r}"
    if rule == "file" and not os.path.isfile(path):
        raise UsageError(f"{shown}: {'is a directory' if os.path.isdir(path) else 'no such file'}, expected a file")
    if rule == "dir" and not os.path.isdir(path):
        raise UsageError(f"{shown}: {'is a file' if os.path.exists(path) else 'no such directory'}, "
                         "expected an existing directory")
    if rule == "outdir" and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{shown} is a file, expected a directory (created when missing)")


def check_flags(args: argparse.Namespace, **rules: str) -> None:
    """Each flag (``name=rule``; skipped when unset) against its rule, before any work starts: the
    first failure is a one-line error naming the flag, the value and what was expected."""
    for name, rule in rules.items():
        value = getattr(args, name)
        if value is None or value == "":
            continue
        if rule in ("file", "dir", "outdir"):
            _check_path(name, value, rule)
            continue
        ok, what = _CHECKS[rule]
        items = value if isinstance(value, (list, tuple)) else (value,)
        if not all(ok(item) for item in items):
            shown = " ".join(map(str, items))
            raise UsageError(f"--{name} {shown}: expected {what}")


EVAL_FLAG_RULES = dict(patch_size="int>=1", vit_depth="int>=1", vit_embed_dim="int>=1", width="int>=1",
                       pool="int>=1", in_chans="int>=1", img_size="int>=1", subset="int>=1",
                       batch_size_per_gpu="int>=1", num_workers="int>=0", pretrained_weights="file",
                       data_path="dir")


_TRUE, _FALSE = ("true", "1", "on", "yes", "t", "y"), ("false", "0", "off", "no", "f", "n")


def bool_flag(value: str) -> bool:
    """argparse type for booleans: true/false, 1/0, on/off, yes/no (any case), as official."""
    lowered = str(value).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean, expected one of true/false, 1/0, on/off, yes/no")


def add_model_args(parser: argparse.ArgumentParser, *, training: bool) -> None:
    """Architecture flags. Evaluation programs default them to None: the checkpoint's stored
    configuration decides, and the official defaults apply to files that store none."""
    default = (lambda value: value) if training else (lambda value: None)
    parser.add_argument("--arch", default=default("vit_small"),
                        help="vit_tiny / vit_small / vit_base, dinov2_vit_small / _base / _large, convnet, "
                             "a torchvision ResNet name, or timm:<name>"
                             + ("" if training else " (default: the checkpoint's, else vit_small)"))
    parser.add_argument("--patch_size", default=default(16), type=int,
                        help="ViT patch size" + ("" if training else " (default: the checkpoint's, else 16)"))
    parser.add_argument("--vit_depth", default=None, type=int, help="ViT: blocks (default: the arch's 12)")
    parser.add_argument("--vit_embed_dim", default=None, type=int, help="ViT: width (default: the arch's)")
    parser.add_argument("--width", default=default(32), type=int, help="convnet width")
    parser.add_argument("--pool", default=default(1), type=int,
                        help="convnet: average-pool the last map to pool x pool cells")


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the evaluation programs: what to evaluate, on which data, where."""
    add_model_args(parser, training=False)
    parser.add_argument("--pretrained_weights", default="", help="checkpoint to evaluate (empty: random init)")
    parser.add_argument("--checkpoint_key", default="teacher",
                        help='entry of a full checkpoint ("teacher" or "student")')
    parser.add_argument("--trusted_checkpoint", type=bool_flag, nargs="?", const=True, default=False,
                        help=TRUST_HELP)
    parser.add_argument("--in_chans", type=int, default=None,
                        help="model input channels for a file without stored configuration (default: 1 for "
                             "fashion_mnist, else 3; grey images are repeated)")
    parser.add_argument("--img_size", type=int, default=None,
                        help="ViT position-table resolution for a file without stored configuration (default: "
                             "28 for fashion_mnist, else 224; other input sizes are interpolated)")
    parser.add_argument("--dataset", choices=("imagefolder", "fashion_mnist"), default=None,
                        help="imagefolder: --data_path/{train,val}; fashion_mnist: the idx files "
                             "(default: the checkpoint's, else imagefolder)")
    parser.add_argument("--data_path", default=None,
                        help="imagefolder: folder with train/ and val/; fashion_mnist: folder of the idx files "
                             "(default: dino_pytorch.datasets.FASHION_MNIST_DIR)")
    parser.add_argument("--train_data", default=None, metavar="PATH",
                        help="own data: the train (bank) images, a folder tree or a file list, labelled by class "
                             "subfolders or 'path<TAB>class' lines (with --val_data; docs/own-data.md)")
    parser.add_argument("--val_data", default=None, metavar="PATH", help="own data: the val (query) images")
    parser.add_argument("--subset", type=int, default=None, help="use only the first N train and N test images")
    parser.add_argument("--batch_size_per_gpu", type=int, default=128, help="batch size of the data loaders")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--num_workers", type=int, default=4, help="data loader workers")
    add_debug_flag(parser)


def eval_setup(args: argparse.Namespace, train_augment: bool) -> tuple[nn.Module, Dataset, Dataset, torch.device]:
    """(frozen backbone, train set, test set, device) of an evaluation program; the data are
    prepared as the checkpoint's configuration says (dataset, channels, image size). The flags
    are checked first (:data:`EVAL_FLAG_RULES`)."""
    check_flags(args, **EVAL_FLAG_RULES)
    device = resolve_device(args.device)
    with setup_phase():
        model, config = backbone_for_eval(args, device)
        data = config["data"]
        dataset = args.dataset or ("imagefolder" if args.train_data else data.get("dataset")) or "imagefolder"
        channels = data.get("in_chans") or image_channels(dataset, config["arch"])
        size = data.get("image_size") or (28 if dataset == "fashion_mnist" else 224)
        # The training's statistics (and band value range) apply to the same kind of data only.
        stats = data if data.get("dataset") == dataset else None
        train_set, test_set = eval_datasets(dataset, args.train_data or args.data_path, channels, size,
                                            train_augment=train_augment, subset=args.subset, stats=stats,
                                            val_path=args.val_data)
    return model, train_set, test_set, device


def resolve_device(device: Optional[str], local_rank: int = 0) -> torch.device:
    """``--device``, defaulting to the CUDA device of this rank when there is one, else the CPU."""
    if device is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"--device {device!r}: {err}") from None
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    return resolved


def is_torchvision_arch(arch: str) -> bool:
    return not (arch.startswith((VIT_PREFIX, DINOV2_PREFIX, "timm:")) or arch == "convnet")


def image_channels(dataset: Optional[str], arch: str, override: Optional[int] = None) -> int:
    """The one channel rule: grey Fashion-MNIST stays 1-channel, except for torchvision models,
    which take RGB only (grey images are repeated); everything else is RGB."""
    if is_torchvision_arch(arch):
        return 3
    if override is not None:
        return override
    return 1 if dataset == "fashion_mnist" else 3


def dataset_stats(dataset: str, channels: int) -> tuple[list[float], list[float]]:
    """Normalisation mean and std of a dataset's images, one entry per channel."""
    from ..augment import IMAGENET_MEAN, IMAGENET_STD
    from ..datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    if dataset == "fashion_mnist":
        return list(FASHION_MNIST_MEAN) * channels, list(FASHION_MNIST_STD) * channels
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def config_from_flags(args: argparse.Namespace, dataset: str, channels: int, image_size: int) -> dict[str, Any]:
    """The model configuration the flags describe (the same ``create_model`` call for every program)."""
    arch = args.arch
    drop_path = getattr(args, "drop_path_rate", 0.0)
    if arch.startswith((VIT_PREFIX, DINOV2_PREFIX)):
        kwargs: dict[str, Any] = dict(patch_size=args.patch_size, in_chans=channels, img_size=image_size,
                                      drop_path_rate=drop_path)
        kwargs.update({k: v for k, v in (("depth", args.vit_depth), ("embed_dim", args.vit_embed_dim)) if v})
        if arch.startswith(DINOV2_PREFIX):  # stored even at their defaults: the file alone rebuilds the ViT
            kwargs.update(num_register_tokens=getattr(args, "num_register_tokens", None) or 0,
                          init_values=getattr(args, "layerscale", None))
    elif arch == "convnet":
        kwargs = dict(in_chans=channels, width=args.width, pool=args.pool)
    elif arch.startswith("timm:"):
        # num_classes=0: no dead classifier parameters (DDP would wait for their gradients).
        kwargs = dict(in_chans=channels, num_classes=0, drop_path_rate=drop_path)
    else:
        kwargs = {}
    mean, std = dataset_stats(dataset, channels)
    data = dict(dataset=dataset, in_chans=channels, image_size=image_size, mean=mean, std=std)
    return make_model_config(arch, kwargs, data=data)


def backbone_from_flags(config: dict[str, Any]) -> nn.Module:
    """:func:`~dino_pytorch.model_config.build_backbone`, with an unknown name as a user error."""
    try:
        return build_backbone(config)
    except (ValueError, ImportError) as err:
        raise UsageError(f"--arch {config['arch']!r}: {err}") from None


def backbone_for_eval(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen backbone to evaluate, in eval mode, and the configuration it was built from.

    Built from the checkpoint's stored configuration unless ``--arch`` is given; a file with no
    stored configuration (official, older, or a custom backbone) is built from the flags, with the
    official defaults. A trailing classifier is replaced by Identity, as the official eval does.
    """
    from ..features import find_classifier

    path = args.pretrained_weights
    raw = read_checkpoint(path, trusted=args.trusted_checkpoint) if path else None
    stored = read_model_config(raw, path) if raw is not None else None
    if stored is not None and args.arch is None:
        config = stored
    else:
        args.arch = args.arch or "vit_small"
        args.patch_size = args.patch_size or 16
        args.width, args.pool = args.width or 32, args.pool or 1
        dataset = args.dataset or "imagefolder"
        channels = image_channels(dataset, args.arch, args.in_chans)
        size = args.img_size or (28 if dataset == "fashion_mnist" else 224)
        config = config_from_flags(args, dataset, channels, size)
    model = backbone_from_flags(config)
    classifier = find_classifier(model)
    if classifier is not None:
        setattr(model, classifier, nn.Identity())
    if raw is not None:
        try:
            load_into(model, None, path, checkpoint_key=args.checkpoint_key, checkpoint=raw)
        except CheckpointError as err:
            hint = "" if stored is not None else (
                f"; {path} stores no model configuration (an official file, one written before dino-pytorch "
                "0.2, or a custom backbone): pass --arch, --patch_size, --vit_depth, --vit_embed_dim, --width, "
                "--pool, --in_chans or --img_size as it was trained")
            raise UsageError(f"--pretrained_weights {path}: {err}{hint}") from None
        print(f"Loaded {args.checkpoint_key!r} weights of {config['arch']} from {path}.", flush=True)
    else:
        print("No --pretrained_weights: evaluating randomly initialised weights.", flush=True)
    return model.to(device).eval(), config


# -------------------------------------------------------------------------------------------- data

class _ImageTensor(Dataset):
    """Normalised one-channel images held in memory, repeated to ``channels`` per item."""

    def __init__(self, images: Tensor, labels: Tensor, channels: int, flip: bool, classes: Sequence[str]) -> None:
        self.images, self.labels, self.channels, self.flip = images, labels, channels, flip
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.flip and bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
        return image.expand(self.channels, -1, -1), int(self.labels[index])


def eval_datasets(
    dataset: str, data_path: Optional[str], channels: int, image_size: int,
    *, train_augment: bool = False, subset: Optional[int] = None, stats: Optional[dict[str, Any]] = None,
    val_path: Optional[str] = None,
) -> tuple[Dataset, Dataset]:
    """(train, test) with the official evaluation transforms; ``train_augment`` adds the linear
    probe's flips (Fashion-MNIST) or its RandomResizedCrop + flip (own data). ``stats``: the
    training's ``mean`` / ``std`` (and ``value_range``), a checkpoint's ``model_config["data"]``.
    imagefolder: ``data_path`` holds ``train/`` and ``val/``, or ``data_path`` and ``val_path`` are
    the two folders or file lists (:func:`dino_pytorch.data.own_eval_sets`)."""
    if dataset == "fashion_mnist":
        from ..datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist

        sets = []
        for train in (True, False):
            images, labels = load_fashion_mnist(train, data_path)
            x = images.float().div_(255)
            if image_size != x.shape[-1]:
                x = torch.nn.functional.interpolate(x, size=image_size, mode="bicubic", align_corners=False)
            mean, std = ((stats["mean"][0], stats["std"][0]) if stats and stats.get("mean")
                         else (FASHION_MNIST_MEAN[0], FASHION_MNIST_STD[0]))
            x = (x - mean) / std
            sets.append(_ImageTensor(x, labels, channels, train and train_augment, FASHION_MNIST_CLASSES))
        train_set, test_set = sets
    elif dataset == "imagefolder":
        from ..data import has_split_folders, own_eval_sets

        if val_path is None and not has_split_folders(data_path):
            raise UsageError(f"--data_path {data_path!r}: expected a folder with train/ and val/ image folders "
                             "(or --train_data and --val_data)")
        own_train, own_test = own_eval_sets(data_path, val_path, channels=channels,  # type: ignore[arg-type]
                                            image_size=image_size, stats=stats, train_augment=train_augment)
        train_set, test_set = own_train, own_test  # type: ignore[assignment]
    else:
        raise UsageError(f"--dataset {dataset!r}, expected imagefolder or fashion_mnist")
    if subset is not None and subset < 1:
        raise UsageError(f"--subset {subset}, expected a positive number of images")
    return first(train_set, subset), first(test_set, subset)


def first(dataset: Dataset, count: Optional[int]) -> Dataset:
    """The first ``count`` items of ``dataset`` (all of it when ``count`` is None)."""
    return dataset if not count else Subset(dataset, range(min(count, len(dataset))))  # type: ignore[arg-type]


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device,
                shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=False)


@torch.no_grad()
def knn_top1(backbone: nn.Module, train_set: Dataset, test_set: Dataset, device: torch.device) -> float:
    """Weighted 20-NN top-1 (%, T = 0.07) of ``backbone`` features, train set -> test set."""
    from ..eval.knn import extract_features, knn_classifier

    train_f, train_y = extract_features(backbone, make_loader(train_set, 512, 0, device), device=device)
    test_f, test_y = extract_features(backbone, make_loader(test_set, 512, 0, device), device=device)
    return knn_classifier(train_f, train_y, test_f, test_y, k=20, T=0.07)[0]


def optional_extra(module: str, what: str, extra: str = "train") -> Any:
    """``import module``, or None after one line saying what is skipped and which extra installs it."""
    try:
        return __import__(module)
    except ImportError:
        print(f"{what} skipped: {module} is not installed (pip install 'dino-pytorch[{extra}]')", flush=True)
        return None


def output_dir(path: str) -> Path:
    """``--output_dir``, created; a path that exists as a file is a user error."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {path!r} is a file, expected a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out
