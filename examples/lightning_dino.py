"""DINO in PyTorch Lightning: the official recipe, right under gradient accumulation, resumable.

    pip install 'dino-pytorch[lightning]'
    python examples/lightning_dino.py --steps 200 --accumulate 2         (after `make venv data`)

:class:`DINOLightning` wraps a :class:`~dino_pytorch.DINO` and places each of its helpers on the
Lightning hook that runs once per *optimizer* step:

* ``optimizer_step``: this step's lr / weight decay (:meth:`DINO.apply_schedules`) before the
  optimizer steps, the EMA of the teacher and the centre update (:meth:`DINO.update_teacher`)
  after it. Lightning calls this hook only when the accumulated micro-batches are complete, so
  ``accumulate_grad_batches=k`` gives one teacher update per k batches, as the official recipe
  (with its global batch) does. ``on_train_batch_end`` would be wrong: it runs per micro-batch.
* ``on_before_optimizer_step``: the gradients are complete (and unscaled under fp16): the
  per-parameter clip and the first-epoch last-layer freeze go here.

Everything DINO needs to resume is in its ``state_dict`` (student, teacher, centre, step), so a
Lightning checkpoint (``trainer.fit(..., ckpt_path=...)``) resumes exactly.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor

from dino_pytorch import DINO

Batch = Union[Sequence[Tensor], tuple[Sequence[Tensor], Any]]


class DINOLightning(L.LightningModule):
    """A ``LightningModule`` training ``dino`` with the official recipe.

    Args:
        dino: the :class:`~dino_pytorch.DINO` to train; build it with
            ``schedules=DINOSchedules.official(total_optimizer_steps, ...)`` for the official
            lr / weight-decay / momentum schedules (without, the optimizer's own lr is used and
            the teacher follows ``DINO``'s momentum settings).
        clip_grad: official per-parameter gradient clip (0: none). Leave the Trainer's
            ``gradient_clip_val`` unset: it would clip a second time, by the global norm.
        freeze_last_layer: epochs during which the prototypes' gradients are dropped (official 1).
        optimizer: builds the optimizer from :meth:`DINO.param_groups` (default: ``AdamW``).

    Batches are the list of views (``[g1, g2, l1, ...]``, each (B, C, H, W)) or ``(views, labels)``
    as a multi-crop dataset yields them; the labels are ignored.
    """

    def __init__(
        self,
        dino: DINO,
        *,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
        optimizer: Optional[Callable[[list[dict[str, Any]]], torch.optim.Optimizer]] = None,
    ) -> None:
        super().__init__()
        self.dino = dino
        self.clip_grad = clip_grad
        self.freeze_last_layer = freeze_last_layer
        self.make_optimizer = optimizer or torch.optim.AdamW

    @staticmethod
    def views_of(batch: Batch) -> list[Tensor]:
        """The views of a batch: the batch itself, or its first entry when it is ``(views, labels)``."""
        first = batch[0]
        return list(first) if isinstance(first, (list, tuple)) else list(batch)  # type: ignore[arg-type]

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """DINO loss of one micro-batch; Lightning divides it by ``accumulate_grad_batches``."""
        loss = self.dino(self.views_of(batch), self.current_epoch)
        self.log("train_loss", loss.detach(), prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimizer over the official parameter groups (lr and weight decay set every step)."""
        return self.make_optimizer(self.dino.param_groups())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Official order on the accumulated gradients: per-parameter clip, then the last-layer freeze."""
        if self.clip_grad:
            self.dino.clip_gradients_(self.clip_grad)
        if self.current_epoch < self.freeze_last_layer:
            self.dino.cancel_last_layer_gradients_()

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Union[torch.optim.Optimizer, LightningOptimizer],
        optimizer_closure: Optional[Callable[[], Any]] = None,
    ) -> None:
        """Once per optimizer step: schedules, the step (the closure runs the last micro-batch), EMA."""
        if self.dino.schedules is not None:
            plain = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
            values = self.dino.apply_schedules(plain)
            self.log_dict({"lr": values["lr"], "wd": values["weight_decay"]})
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # After the step, never per micro-batch: the centre statistics of all k micro-batches are
        # applied at once and the teacher takes one EMA step, as with a k-times larger batch.
        momentum = self.dino.update_teacher()
        self.log("momentum", momentum)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Train a small ConvNet with DINO on Fashion-MNIST through a Lightning ``Trainer``."""
    from torch.utils.data import DataLoader

    from dino_pytorch import MultiCropTransform
    from dino_pytorch.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST
    from dino_pytorch.models import ConvNet
    from dino_pytorch.schedules import DINOSchedules

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--batch_size", type=int, default=64, help="micro-batch size")
    parser.add_argument("--output_dir", default="runs/lightning")
    parser.add_argument("--resume", default=None,
                        help="a Lightning checkpoint to resume from (e.g. OUTPUT_DIR/last.ckpt); exact from an "
                             "epoch end, while from mid-epoch a plain DataLoader restarts the epoch's data")
    args = parser.parse_args(argv)
    L.seed_everything(0)

    transform = MultiCropTransform(global_crop_size=28, local_crop_size=16, local_crops_number=6,
                                   local_crops_scale=(0.1, 0.4), mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    loader = DataLoader(FashionMNIST(train=True, transform=transform), batch_size=args.batch_size,
                        shuffle=True, drop_last=True, num_workers=1, persistent_workers=True)
    # The official lr scaling uses the global batch: micro-batch x accumulation (x devices).
    schedules = DINOSchedules.official(args.steps, lr=2e-3 * args.batch_size * args.accumulate / 256,
                                       warmup_steps=args.steps // 10, momentum_teacher=0.99)
    dino = DINO(ConvNet(in_chans=1, width=16, pool=2), out_dim=4096, use_bn=True, hidden_dim=512,
                bottleneck_dim=128, schedules=schedules)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    checkpoints = ModelCheckpoint(args.output_dir, every_n_train_steps=50, save_last=True)
    trainer = L.Trainer(max_steps=args.steps, accumulate_grad_batches=args.accumulate, callbacks=[checkpoints],
                        default_root_dir=args.output_dir, log_every_n_steps=10)
    trainer.fit(DINOLightning(dino, freeze_last_layer=0), loader, ckpt_path=args.resume)
    torch.save(dino.teacher_backbone.state_dict(), f"{args.output_dir}/teacher_backbone.pth")


if __name__ == "__main__":
    main()
