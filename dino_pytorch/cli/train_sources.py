"""dino-train's data source: which images (Fashion-MNIST, a folder tree or a file list), how many
channels the model takes (``--in_chans``), the normalisation statistics (``--mean`` / ``--std``,
measured with ``auto``) and the value range of band files (``--value_range``), resolved once at
start-up (:func:`open_train_data`); the count of undecodable files the run replaced
(:class:`ReplacedFiles`); and the k-NN and attention maps of own data, read with the run's
statistics (:class:`OwnDataKnn`, :func:`own_attention_maps`).

The defaults: Fashion-MNIST keeps its own statistics and RGB photos ImageNet's (the official
recipe); every other kind of data (grey photos for ``--in_chans 1``, band files) is measured as
``auto`` does, said in one line. Float band files without ``--value_range`` get theirs measured on
the same sample (:mod:`dino_pytorch.data.statistics`).
"""
from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from .. import distributed
from ..dino import DINO
from ..model_config import is_vit
from ._setup import UsageError, dataset_stats, first, is_torchvision_arch, knn_top1
from .report_hook import ReportHook
from .train_evals import KnnEvals
from .train_report import RunLog

SHOWN_NAMES = 5  # the undecodable files named in the reports


@dataclass
class TrainSource:
    """The resolved training data: ``dataset`` (items ``(image, label[, replaced])``), the model's
    ``channels``, per-channel ``mean`` / ``std``, band files' ``value_range`` (None: dtype ranges or
    photos), whether there are labels, and how the statistics were obtained (``statistics``)."""

    dataset: Dataset
    path: Optional[str]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_range: Optional[tuple[tuple[float, float], ...]]
    labelled: bool
    statistics: str

    def config_entry(self) -> dict[str, Any]:
        """What the checkpoint's ``model_config["data"]`` stores of it (plain types)."""
        return {"in_chans": self.channels, "mean": list(self.mean), "std": list(self.std),
                "value_range": [list(pair) for pair in self.value_range] if self.value_range else None,
                "statistics": self.statistics}


def _flag_values(name: str, values: Optional[Sequence[str]], channels: int) -> Union[None, str, tuple[float, ...]]:
    """``--mean`` / ``--std``: None (not given), "auto", or one float per channel."""
    if values is None:
        return None
    if list(values) == ["auto"]:
        return "auto"
    shown = " ".join(values)
    try:
        numbers = tuple(float(v) for v in values)
    except ValueError:
        raise UsageError(f"--{name} {shown}: expected auto or {channels} numbers, one per channel") from None
    if len(numbers) != channels:
        raise UsageError(f"--{name} {shown}: {len(numbers)} numbers for {channels}-channel images; expected auto "
                         f"or {channels} numbers")
    return numbers


def open_dataset(args: argparse.Namespace) -> Dataset:
    """The training images: Fashion-MNIST, or the folder (``--data_path``) or list (``--file_list``)."""
    if args.dataset == "fashion_mnist":
        from ..datasets import FashionMNIST

        return FashionMNIST(train=True)
    from ..augment import MultiCropRecipe
    from ..data import ImageFiles

    # A file too small for the recipe's smallest crop is replaced like a corrupt one (and left out of
    # the statistics); the smallest crop depends on the scales only.
    scales = MultiCropRecipe(args.global_crops_scale, args.local_crops_scale, args.local_crops_number)
    min_pixels = scales.min_image_pixels
    flag, path = ("file_list", args.file_list) if args.file_list else ("data_path", args.data_path)
    try:
        files = ImageFiles.open(path, report_failures=True, min_pixels=min_pixels)
    except (ValueError, OSError) as err:
        raise UsageError(f"--{flag} {path!r}: {err}") from None
    if args.value_range is None:
        return files
    pairs = args.value_range
    try:
        if files.photos:
            raise ValueError("only band files (.npy, .tif, 16-bit PNG) have a value range; these are photos")
        return files.with_value_range([pairs[i:i + 2] for i in range(0, len(pairs), 2)] if len(pairs) > 2 else pairs)
    except ValueError as err:
        raise UsageError(f"--value_range {' '.join(map(str, pairs))}: {err}") from None


def resolve_channels(args: argparse.Namespace, found: int, grey_or_rgb: bool, where: str) -> int:
    """``--in_chans`` against the data: grey or RGB images (Fashion-MNIST, photos) make 1 or 3
    channels (converted as the augmenters do), band files exactly theirs; torchvision models take 3."""
    allowed = [1, 3] if grey_or_rgb else [found]
    default = (1 if args.dataset == "fashion_mnist" else 3) if grey_or_rgb else found
    if is_torchvision_arch(args.arch):
        if 3 not in allowed or args.in_chans not in (None, 3):
            given = f"--in_chans {args.in_chans}" if args.in_chans else f"the data ({where}) have {found}"
            raise UsageError(f"--arch {args.arch}: a torchvision model takes 3 channels, and {given}")
        return 3
    if args.in_chans is None:
        return default
    if args.in_chans not in allowed:
        expected = "1 or 3" if grey_or_rgb else str(found)
        raise UsageError(f"--in_chans {args.in_chans}: the data ({where}) have {found} channel"
                         f"{'s' if found != 1 else ''}; expected {expected}")
    return int(args.in_chans)


def open_train_data(args: argparse.Namespace, announce: bool = True) -> TrainSource:
    """The training data with its channels and statistics resolved (``args.in_chans`` set); one-line
    errors naming the flag. ``announce``: print the measured statistics (rank 0)."""
    from ..data import ImageFiles, sample_statistics

    dataset = open_dataset(args)
    files = dataset if isinstance(dataset, ImageFiles) else None
    where = "Fashion-MNIST" if files is None else (args.file_list or args.data_path)
    found = 1 if files is None else files.channels
    grey_or_rgb = files is None or files.photos
    args.in_chans = channels = resolve_channels(args, found, grey_or_rgb, where)
    given_mean, given_std = _flag_values("mean", args.mean, channels), _flag_values("std", args.std, channels)
    defaults: tuple[Any, Any] = ("auto", "auto")  # no published statistics for this kind of data
    if files is None or (files.photos and channels == 3):
        defaults = dataset_stats(args.dataset, channels)
    mean: Any = defaults[0] if given_mean is None else given_mean
    std: Any = defaults[1] if given_std is None else given_std
    value_range = files.value_range if files is not None else None
    how = "given" if args.mean is not None or args.std is not None else "default"
    if "auto" in (mean, std) or (files is not None and files.float_bands and value_range is None):
        try:
            measured = sample_statistics(dataset, seed=args.seed, channels=channels)
        except ValueError as err:
            raise UsageError(f"--mean {' '.join(args.mean or ['auto'])}: {err}") from None
        value_range = measured.value_range or value_range
        if measured.value_range is not None:
            dataset = files.with_value_range(measured.value_range)  # type: ignore[union-attr]
        if "auto" in (mean, std):
            how = f"auto ({measured.images} images, seed {args.seed})"
        mean = measured.mean if mean == "auto" else mean
        std = measured.std if std == "auto" else std
        if announce:
            _say_statistics(measured, mean, std, value_range, args, where)
    labelled = files is None or files.labelled
    return TrainSource(dataset, None if files is None else where, channels, tuple(mean), tuple(std),
                       value_range, labelled, how)


def _say_statistics(measured: Any, mean: Sequence[float], std: Sequence[float], value_range: Any,
                    args: argparse.Namespace, where: str) -> None:
    shown = lambda values: " ".join(f"{v:.4g}" for v in values)  # noqa: E731
    line = (f"data statistics of {where} ({measured.images} sampled images, seed {args.seed}): "
            f"mean {shown(mean)}, std {shown(std)}")
    if measured.value_range is not None:
        line += f"; value range per band {' '.join(f'[{lo:.4g}, {hi:.4g}]' for lo, hi in value_range)}"
    if measured.skipped:
        line += f"; {len(measured.skipped)} undecodable files skipped"
    print(line, flush=True)


class ReplacedFiles:
    """The undecodable files the training items stood in for, carried back with each batch (the
    DataLoader workers are other processes): each read that failed is counted, each file named once
    (the first :data:`SHOWN_NAMES` with their reasons), said in one line at the first log point after
    new ones and at the end. With several processes the ranks' entries are gathered at log points,
    which every rank reaches at the same step; the end line adds rank 0's entries since the last."""

    def __init__(self, is_main: bool) -> None:
        self.is_main = is_main
        self.local: list[str] = []  # "name<TAB>reason" lines of this process since the last log point
        self.reads = 0
        self.files: dict[str, str] = {}  # name -> reason, in the order first seen
        self.reported = 0

    def add(self, batch_entries: Sequence[Any]) -> None:
        """The replaced-files entry of one batch (a list of one string per item), or nothing."""
        for entry in batch_entries[0] if batch_entries else ():
            self.local.extend(line for line in entry.split("\n") if line)

    def _merge(self, gathered: Sequence[Sequence[str]]) -> None:
        for lines in gathered:
            self.reads += len(lines)
            for line in lines:
                name, _, reason = line.partition("\t")
                self.files.setdefault(name, reason)
        self.local = []

    def log_point(self) -> None:
        """Merge every rank's new entries; rank 0 says the counts when they grew."""
        gathered: list[list[str]] = [self.local]
        if distributed.is_distributed():
            gathered = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, self.local)
        self._merge(gathered)
        if self.is_main and self.reads > self.reported:
            self.reported = self.reads
            print(f"data: {self._counts()} replaced by other samples so far (first: {next(iter(self.files))})",
                  flush=True)

    def finish(self) -> None:
        """The end-of-run line (rank 0): the counts and the first files named with their reasons."""
        self._merge([self.local])
        if self.is_main and self.reads:
            named = "; ".join(f"{name} ({reason})" for name, reason in list(self.files.items())[:SHOWN_NAMES])
            print(f"data: {self._counts()} replaced by other samples in this run; first: {named}", flush=True)

    def _counts(self) -> str:
        files, reads = len(self.files), self.reads
        return f"{files} undecodable file{'s' if files != 1 else ''} ({reads} read{'s' if reads != 1 else ''})"


KNN_K = 20  # knn_top1's k


class _Unevaluable(Exception):
    """Too few labelled images for the k-NN."""


class OwnDataKnn(KnnEvals):
    """:class:`~dino_pytorch.cli.train_evals.KnnEvals` on a folder or a file list: the sets are the
    folder's ``train/`` and ``val/``, else a split of the training files
    (:func:`~dino_pytorch.data.own_eval_sets`), read with the run's statistics and built once.
    Unlabelled data skip every k-NN, said in one line; so does a file the evaluation cannot read."""

    def __init__(self, args: argparse.Namespace, dino: DINO, source: TrainSource, device: torch.device,
                 run_log: RunLog, hook: ReportHook, is_main: bool) -> None:
        super().__init__(args, dino, source.path, device, run_log, hook, is_main)
        self.source, self.on = source, source.labelled
        self.sets: Optional[tuple[Dataset, Dataset]] = None
        if not self.on and is_main and (args.knn_every or not args.no_final_knn):
            print(f"k-NN evaluations skipped: {source.path} has no labels (class subfolders, or 'path<TAB>class' "
                  "lines in a file list)", flush=True)

    def top1(self, train_n: Optional[int] = None, test_n: Optional[int] = None) -> float:
        from ..data import own_eval_sets

        if self.sets is None:
            stats = {"mean": self.source.mean, "std": self.source.std, "value_range": self.source.value_range}
            self.sets = own_eval_sets(self.source.path, channels=self.source.channels,  # type: ignore[arg-type]
                                      image_size=self.args.global_crop_size, stats=stats)
        train_set, test_set = first(self.sets[0], train_n), first(self.sets[1], test_n)
        if len(train_set) < KNN_K:  # type: ignore[arg-type]
            raise _Unevaluable(f"{len(train_set)} labelled bank images, and the {KNN_K}-NN needs {KNN_K}")  # type: ignore[arg-type]
        return knn_top1(self.dino.teacher_backbone, train_set, test_set, self.device)

    def _guarded(self, evaluate: Callable[[], None]) -> None:
        from ..data import DecodeError

        if not self.on:
            return
        try:
            evaluate()
        except (DecodeError, _Unevaluable) as err:
            if self.on and self.is_main:  # once: at_random_init nests periodic
                print(f"k-NN evaluations skipped from here on: {err}", flush=True)
            self.on = False

    def periodic(self, step: int) -> None:
        self._guarded(lambda: super(OwnDataKnn, self).periodic(step))

    def at_random_init(self) -> None:
        self._guarded(super().at_random_init)

    def final(self, out: Path) -> None:
        self._guarded(lambda: super(OwnDataKnn, self).final(out))


def own_attention_maps(out: Path, backbone: nn.Module, config: dict[str, Any], count: int, evals: KnnEvals) -> int:
    """The end-of-run attention maps of own data, drawn here with the run's statistics (the shared
    picture code reads ImageNet's); returns how many are left for it to draw (0 for own data)."""
    if not isinstance(evals, OwnDataKnn) or count == 0 or not is_vit(config):
        return count
    if evals.source.channels not in (1, 3):
        print(f"attention maps skipped: {evals.source.channels}-channel images have no picture", flush=True)
        return 0
    if importlib.util.find_spec("matplotlib") is None:
        return count  # the picture code says in one line that matplotlib is missing
    from ..attention import save_dataset_attention_maps
    from ..data import own_eval_sets

    stats = {"mean": evals.source.mean, "std": evals.source.std, "value_range": evals.source.value_range}
    try:
        images = own_eval_sets(evals.source.path, channels=evals.source.channels,  # type: ignore[arg-type]
                               image_size=config["data"]["image_size"], stats=stats)[1]
        save_dataset_attention_maps(backbone, images, out / "attention", count)
    except ValueError as err:  # a file that cannot be read (DecodeError) or too few images
        print(f"attention maps skipped: {err}", flush=True)
    return 0
