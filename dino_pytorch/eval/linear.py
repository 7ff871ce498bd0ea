"""Linear probe on a frozen backbone (the official ``eval_linear.py`` recipe).

Features (frozen backbone, eval mode, no_grad): for a ViT the CLS tokens of the last
``n_last_blocks`` blocks' normed outputs, concatenated in block order, optionally followed by the
mean of the last block's patch tokens; any other model gives ``model(x)``. A ``Linear`` layer on
top is trained with SGD (momentum 0.9, no weight decay), lr scaled by batch/256 and a per-epoch
cosine schedule to 0, under cross-entropy.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import get_world_size
from ..validate import (
    check_bool,
    check_device,
    check_float,
    check_optional_positive_int,
    check_positive_int,
    check_positive_ints,
    check_probability,
)
from ..wrapper import backbone_tensor

__all__ = ["LinearClassifier", "vit_linear_features", "train_linear_probe", "num_labels"]


class LinearClassifier(nn.Module):
    """``Linear(dim, num_labels)`` on flattened input; weight ~ N(0, 0.01), bias 0 (official).

    Shapes: (B, ...) with ``dim`` elements per sample -> (B, num_labels) logits.
    """

    def __init__(self, dim: int, num_labels: int = 1000) -> None:
        super().__init__()
        dim, num_labels = check_positive_ints(dim=dim, num_labels=num_labels)
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


def _check_feature_options(model: Any, n_last_blocks: int, avgpool_patchtokens: bool,
                           official_interleave: bool) -> int:
    """The options of :func:`vit_linear_features` for ``model``; returns ``n_last_blocks`` as an int."""
    n_last_blocks = check_positive_int("n_last_blocks", n_last_blocks)
    check_bool("avgpool_patchtokens", avgpool_patchtokens)
    check_bool("official_interleave", official_interleave)
    if getattr(model, "get_intermediate_layers", None) is None:
        given = [f"{name}=True" for name, value in (("avgpool_patchtokens", avgpool_patchtokens),
                                                    ("official_interleave", official_interleave)) if value]
        if given:
            raise ValueError(
                f"{' and '.join(given)}, but the model ({type(model).__name__}) has no get_intermediate_layers: "
                "not a ViT, it has no patch tokens and its features are model(x); expected False"
            )
        return n_last_blocks
    if official_interleave and not avgpool_patchtokens:
        raise ValueError("official_interleave=True needs avgpool_patchtokens=True: it only changes how "
                         "the CLS tokens and the patch-token average are joined")
    if official_interleave and n_last_blocks != 1:
        raise ValueError(f"official_interleave=True with n_last_blocks={n_last_blocks}: the official layout "
                         "only exists for n_last_blocks=1 (the official script crashes otherwise); use the "
                         "default concatenated layout")
    return n_last_blocks


def vit_linear_features(
    model: nn.Module,
    x: Tensor,
    n_last_blocks: int = 4,
    avgpool_patchtokens: bool = False,
    *,
    official_interleave: bool = False,
) -> Tensor:
    """Linear-probe features of a batch, the official feature choice.

    With ``model.get_intermediate_layers(x, n)`` (a list of n normed (B, N+1, D) token maps; for
    DINOv2's :class:`~dino_pytorch.models.DinoVisionTransformer` its CLS and patch tokens, registers left out):
    ``[cls_1 | ... | cls_n]`` (B, n·D) with block n the last; with ``avgpool_patchtokens`` the
    mean of the last block's patch tokens is appended, ``[cls_1 | ... | cls_n | avg]`` (B, (n+1)·D).

    The official code joins CLS and average with a cat on a new last dimension and a reshape,
    which interleaves them elementwise, ``(cls[0], avg[0], cls[1], avg[1], ...)``, and only works
    for n = 1 (it crashes for n > 1). ``official_interleave=True`` reproduces that layout exactly,
    e.g. to use linear weights trained by the official script (ViT-B: n=1 with avgpool); the
    concatenated layout holds the same numbers, permuted.

    Models without ``get_intermediate_layers`` (ResNets, ...) return ``model(x)``: (B, D); for them
    ``avgpool_patchtokens`` and ``official_interleave`` raise a ValueError (there are no patch tokens).
    """
    n_last_blocks = _check_feature_options(model, n_last_blocks, avgpool_patchtokens, official_interleave)
    get_intermediate_layers = getattr(model, "get_intermediate_layers", None)
    if get_intermediate_layers is None:
        return backbone_tensor(model(x), "model")
    from ..models.dinov2_vit import DinoVisionTransformer

    if isinstance(model, DinoVisionTransformer):  # DINOv2's method returns patch tokens only: put CLS back first
        outputs = [torch.cat((cls.unsqueeze(1), patches), dim=1)
                   for patches, cls in model.get_intermediate_layers(x, n_last_blocks, return_class_token=True)]
    else:
        outputs = get_intermediate_layers(x, n_last_blocks)
    if len(outputs) != n_last_blocks:
        raise ValueError(f"get_intermediate_layers(x, {n_last_blocks}) returned {len(outputs)} token maps, "
                         f"expected {n_last_blocks}")
    features = torch.cat([tokens[:, 0] for tokens in outputs], dim=-1)  # (B, n·D)
    if not avgpool_patchtokens:
        return features
    avg = outputs[-1][:, 1:].mean(dim=1)  # (B, D)
    if official_interleave:
        return torch.stack((features, avg), dim=-1).flatten(1)  # (B, 2D): cls[0], avg[0], cls[1], ...
    return torch.cat((features, avg), dim=-1)


def _topk_hits(logits: Tensor, targets: Tensor) -> tuple[int, int]:
    """Top-1 and top-min(5, C) hits of (B, C) logits against (B,) targets."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == targets.view(-1, 1)
    return int(hits[:, 0].sum()), int(hits.sum())


def _check_labels(targets: Any, num_labels: int, loader_name: str, index: int) -> None:
    """Labels in ``[0, num_labels)``, checked on CPU tensors only: reading CUDA labels would
    synchronise the device every batch (there an out-of-range label fails in the loss)."""
    if isinstance(targets, Tensor) and targets.device.type == "cpu" and targets.numel() > 0:
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_labels:
            raise ValueError(f"{loader_name} yielded the label {low if low < 0 else high} in batch {index}, expected "
                             f"labels in [0, num_labels) with num_labels={num_labels}")


def _batches(loader: Iterable, device: torch.device, num_labels: int,
             loader_name: str) -> Iterator[tuple[Tensor, Tensor]]:
    for index, batch in enumerate(loader):
        _check_labels(batch[1], num_labels, loader_name, index)
        yield batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


class _FeatureFn:
    """Frozen-backbone features under no_grad, in fp32."""

    def __init__(self, backbone: nn.Module, n_last_blocks: int, avgpool: bool, interleave: bool,
                 num_labels: int) -> None:
        self.n = _check_feature_options(backbone, n_last_blocks, avgpool, interleave)
        self.backbone, self.avgpool, self.interleave = backbone, avgpool, interleave
        self.num_labels = num_labels  # the labels the loaders may yield, [0, num_labels)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        if images.is_floating_point():
            images = images.float()
        return vit_linear_features(self.backbone, images, self.n, self.avgpool,
                                   official_interleave=self.interleave).float()


@torch.no_grad()
def _precompute(features: _FeatureFn, loader: Iterable, device: torch.device,
                loader_name: str) -> tuple[Tensor, Tensor]:
    feats, labels = [], []
    for images, targets in _batches(loader, device, features.num_labels, loader_name):
        feats.append(features(images))
        labels.append(targets.long())
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def _evaluate(classifier: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, float, float]:
    """(top1, top5, mean loss) in percent over ``batches`` of (features, labels)."""
    classifier.eval()
    top1 = top5 = n = 0
    loss_sum = 0.0
    for feats, targets in batches:
        logits = classifier(feats)
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        h1, h5 = _topk_hits(logits, targets)
        top1, top5, n = top1 + h1, top5 + h5, n + targets.shape[0]
    if n == 0:
        raise ValueError("val_loader yielded no samples, expected at least one")
    return top1 * 100.0 / n, top5 * 100.0 / n, loss_sum / n


def train_linear_probe(
    backbone: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    num_labels: int,
    *,
    epochs: int = 100,
    lr: float = 0.001,
    batch_size_for_lr: Optional[int] = None,
    n_last_blocks: int = 4,
    avgpool_patchtokens: bool = False,
    official_interleave: bool = False,
    device: Union[str, torch.device] = "cpu",
    val_freq: int = 1,
    precompute_features: bool = False,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    checkpoint_path: Optional[str] = None,
    log: Optional[Callable[[dict[str, Any]], None]] = None,
) -> dict[str, Any]:
    """Trains a :class:`LinearClassifier` on frozen ``backbone`` features (official recipe).

    Args:
        backbone: frozen (eval mode, no_grad) feature extractor; see :func:`vit_linear_features`.
        train_loader: yields ``(images, labels)``; the official train loader augments
            (RandomResizedCrop + flip).
        val_loader: yields ``(images, labels)``, without augmentation.
        num_labels: number of classes; every label the loaders yield must lie in ``[0, num_labels)``
            (checked on CPU label tensors, the DataLoader's; labels already on a GPU are not read).
        lr: base learning rate, finite and ``>= 0``, scaled by ``batch_size_for_lr / 256``.
        batch_size_for_lr: the total batch size of the scaling, a positive int; None (default) takes
            ``train_loader.batch_size`` times the world size (the official total batch).
        n_last_blocks: see :func:`vit_linear_features`.
        avgpool_patchtokens: see :func:`vit_linear_features` (ViTs only: True raises for other models).
        official_interleave: see :func:`vit_linear_features` (ViTs only).
        device: where the features and the classifier live: a ``torch.device`` or a device string.
        momentum: SGD momentum, in ``[0, 1]``.
        weight_decay: SGD weight decay, finite and ``>= 0``.
        precompute_features: extract the train and val features once and train on the cache. Much
            faster (the backbone runs once instead of every epoch) but NOT the official recipe: the
            train features are those of whatever ``train_loader`` yields once, so pass a loader
            without augmentation. Cached batches are reshuffled every epoch.
        val_freq: evaluate every ``val_freq`` epochs and after the last one.
        checkpoint_path: if given, the state is ``torch.save``-d there after every evaluation
            (plain tensors and dicts, loadable with ``weights_only=True``).
        log: called with each epoch's stats dict.

    Returns:
        dict with ``best_top1`` (the best evaluated top-1), ``best_top5`` (top-5 of that epoch),
        ``best_epoch``, ``final_top1``, ``final_top5`` (all in percent, top-5 is top-min(5, C)),
        ``classifier`` (the trained :class:`LinearClassifier`), ``feature_dim``, ``lr`` (the scaled
        one), ``history`` (the stats dicts) and ``state`` (what ``checkpoint_path`` receives).

    Raises:
        TypeError, ValueError: a bad argument, checked before any work (the message names it and its
            value), or a label outside ``[0, num_labels)`` in a batch (the message names the loader).
    """
    epochs, val_freq, num_labels = check_positive_ints(epochs=epochs, val_freq=val_freq, num_labels=num_labels)
    lr, batch_size_for_lr, momentum, weight_decay = _check_optimiser_args(lr, batch_size_for_lr, momentum,
                                                                          weight_decay)
    device = _check_run_args(backbone, device, precompute_features, log)
    features = _FeatureFn(backbone, n_last_blocks, avgpool_patchtokens, official_interleave, num_labels)
    if batch_size_for_lr is None:
        batch_size = getattr(train_loader, "batch_size", None)
        if batch_size is None:
            raise ValueError("train_loader has no batch_size attribute: pass batch_size_for_lr= (the total batch size)")
        batch_size_for_lr = batch_size * get_world_size()
    cache_batch = (getattr(train_loader, "batch_size", None) or batch_size_for_lr) if precompute_features else None
    was_training = backbone.training
    backbone.eval()
    try:
        train_batches, val_batches = _feature_batches(features, train_loader, val_loader, device, cache_batch)
        return _fit(train_batches, val_batches, num_labels, device, epochs=epochs, lr=lr * batch_size_for_lr / 256.0,
                    momentum=momentum, weight_decay=weight_decay, val_freq=val_freq,
                    checkpoint_path=checkpoint_path, log=log)
    finally:
        backbone.train(was_training)


def _check_optimiser_args(lr: Any, batch_size_for_lr: Any, momentum: Any,
                          weight_decay: Any) -> tuple[float, Optional[int], float, float]:
    """The probe's optimiser arguments as given (``lr`` before its batch-size scaling), normalised."""
    return (check_float("lr", lr, low=0.0), check_optional_positive_int("batch_size_for_lr", batch_size_for_lr),
            check_probability("momentum", momentum), check_float("weight_decay", weight_decay, low=0.0))


def _check_run_args(backbone: Any, device: Any, precompute_features: Any, log: Any) -> torch.device:
    """The probe's other arguments; returns the device."""
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone is a {type(backbone).__name__}, expected an nn.Module")
    check_bool("precompute_features", precompute_features)
    if log is not None and not callable(log):
        raise TypeError(f"log={log!r}, expected a callable taking each epoch's stats dict, or None")
    return check_device("device", device)


Batches = Callable[[], Iterator[tuple[Tensor, Tensor]]]


def _live_batches(features: _FeatureFn, loader: Iterable, device: torch.device,
                  loader_name: str) -> Iterator[tuple[Tensor, Tensor]]:
    for images, targets in _batches(loader, device, features.num_labels, loader_name):
        yield features(images), targets.long()


def _feature_batches(features: _FeatureFn, train_loader: Iterable, val_loader: Iterable, device: torch.device,
                     cache_batch: Optional[int]) -> tuple[Batches, Batches]:
    """(train, val): each call starts one pass of ``(features (B, D), labels (B,))`` batches.

    With ``cache_batch``, both sets' features are extracted once here, and each train pass
    reshuffles the cached rows into batches of ``cache_batch``; else every pass runs the backbone
    on what the loader yields.
    """
    if cache_batch is None:
        return (partial(_live_batches, features, train_loader, device, "train_loader"),
                partial(_live_batches, features, val_loader, device, "val_loader"))

    train_cache = _precompute(features, train_loader, device, "train_loader")
    val_cache = _precompute(features, val_loader, device, "val_loader")

    def train_batches() -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(train_cache[1].shape[0], device=device)
        for i in range(0, order.shape[0], cache_batch):
            idx = order[i: i + cache_batch]
            yield train_cache[0][idx], train_cache[1][idx]

    def val_batches() -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, val_cache[1].shape[0], 4096):
            yield val_cache[0][i: i + 4096], val_cache[1][i: i + 4096]

    return train_batches, val_batches


def _train_epoch(classifier: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[Tensor, Tensor]],
                 device: torch.device) -> float:
    """One pass of SGD over ``batches`` of (features, labels); returns the mean loss per sample."""
    classifier.train()
    loss_sum, seen = torch.zeros((), device=device), 0
    for feats, targets in batches:
        loss = F.cross_entropy(classifier(feats), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * targets.shape[0]  # stays on device: no sync per step
        seen += targets.shape[0]
    return float(loss_sum) / max(seen, 1)


def _fit(train_batches: Batches, val_batches: Batches, num_labels: int, device: torch.device, *, epochs: int,
         lr: float, momentum: float, weight_decay: float, val_freq: int, checkpoint_path: Optional[str],
         log: Optional[Callable[[dict[str, Any]], None]]) -> dict[str, Any]:
    """The probe's training (``lr`` already scaled), evaluations and checkpoints: what
    :func:`train_linear_probe` returns."""
    # The first batch sizes the classifier, then starts epoch 0.
    pending = train_batches()
    first = next(pending, None)
    if first is None:
        raise ValueError("train_loader yielded no batches, expected at least one")
    feature_dim = first[0][0].numel()
    classifier = LinearClassifier(feature_dim, num_labels).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    history: list[dict[str, Any]] = []
    best = {"top1": -math.inf, "top5": 0.0, "epoch": -1}
    final = (0.0, 0.0)
    state: dict[str, Any] = {}
    for epoch in range(epochs):
        batches = itertools.chain([first], pending) if epoch == 0 else train_batches()
        stats: dict[str, Any] = {"epoch": epoch, "train_loss": _train_epoch(classifier, optimizer, batches, device),
                                 "lr": optimizer.param_groups[0]["lr"]}
        scheduler.step()
        if epoch % val_freq == 0 or epoch == epochs - 1:
            top1, top5, val_loss = _evaluate(classifier, val_batches())
            final = (top1, top5)
            if top1 > best["top1"]:
                best = {"top1": top1, "top5": top5, "epoch": epoch}
            stats.update(val_top1=top1, val_top5=top5, val_loss=val_loss, best_top1=best["top1"])
            state = {"epoch": epoch + 1, "state_dict": classifier.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "best_acc": best["top1"]}
            if checkpoint_path:
                torch.save(state, checkpoint_path)
        history.append(stats)
        if log is not None:
            log(stats)
    return {
        "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
        "final_top1": final[0], "final_top5": final[1], "classifier": classifier,
        "feature_dim": feature_dim, "lr": lr, "history": history, "state": state,
    }


def num_labels(dataset: Any) -> int:
    """Classes of a dataset (through Subset wrappers): ``classes`` if present, else max label + 1."""
    inner = dataset
    while hasattr(inner, "dataset") and not hasattr(inner, "classes"):
        inner = inner.dataset
    classes = getattr(inner, "classes", None)
    if classes:
        return len(classes)
    return 1 + max(int(dataset[i][1]) for i in range(len(dataset)))
