"""examples/lightning_dino.py: one teacher update per optimizer step under gradient accumulation,
the same numbers as a plain loop, and an exact resume from a Lightning checkpoint."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dino_pytorch import DINO
from dino_pytorch.schedules import DINOSchedules

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lightning_dino", ROOT / "examples" / "lightning_dino.py")
assert _spec is not None and _spec.loader is not None
lightning_dino = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lightning_dino)

STEPS, ACCUMULATE, MICRO_PER_EPOCH = 4, 2, 4  # 2 optimizer steps per epoch: the freeze ends at epoch 1
# Lightning's advice about DataLoader workers and logging intervals is noise for a 4-step fit, and
# its own use of a torch pytree API that torch deprecates is not this project's to fix.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore:.*LeafSpec")]


class Views(Dataset):
    """Fixed random multi-crop views: 2 global (3, 8, 8) and 2 local (3, 4, 4) per item."""

    def __init__(self, n: int = MICRO_PER_EPOCH * 2) -> None:
        g = torch.Generator().manual_seed(123)
        self.items = [[torch.randn(3, 8, 8, generator=g) for _ in range(2)] + [torch.randn(3, 4, 4, generator=g)
                                                                                for _ in range(2)] for _ in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return self.items[i]


def loader() -> DataLoader:
    return DataLoader(Views(), batch_size=2, shuffle=False)  # 4 micro-batches per epoch


def make_dino(seed: int = 0) -> DINO:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    schedules = DINOSchedules.official(STEPS, lr=1e-2, momentum_teacher=0.9)
    return DINO(backbone, out_dim=32, embed_dim=8, hidden_dim=16, bottleneck_dim=8, schedules=schedules)


def trainer(*callbacks: Callback) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, accumulate_grad_batches=ACCUMULATE,
                     logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                     callbacks=list(callbacks))


def plain_loop(dino: DINO, clip: float = 3.0, freeze_last_layer: int = 1) -> torch.optim.Optimizer:
    """The reference: the official recipe by hand, 2 micro-batches per optimizer step."""
    optimizer = torch.optim.AdamW(dino.param_groups())
    batches = [b for _ in range(STEPS * ACCUMULATE // MICRO_PER_EPOCH) for b in loader()]
    dino.train()
    for step in range(STEPS):
        epoch = step * ACCUMULATE // MICRO_PER_EPOCH
        dino.apply_schedules(optimizer)
        optimizer.zero_grad(set_to_none=True)
        for views in batches[step * ACCUMULATE:(step + 1) * ACCUMULATE]:
            (dino(views, epoch) / ACCUMULATE).backward()
        dino.clip_gradients_(clip)
        if epoch < freeze_last_layer:
            dino.cancel_last_layer_gradients_()
        optimizer.step()
        dino.update_teacher()
    return optimizer


def teacher_vector(dino: DINO) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in dino.teacher.parameters()])


class TeacherVersions(Callback):
    """The teacher after every micro-batch: it must change only at accumulation boundaries."""

    def __init__(self) -> None:
        self.snapshots: list[torch.Tensor] = []

    def on_train_start(self, trainer, module) -> None:
        self.snapshots.append(teacher_vector(module.dino))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.snapshots.append(teacher_vector(module.dino))


class CrashAt(Callback):
    """Stop the run abruptly (as a killed job would) once ``step`` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def assert_same_state(a: DINO, b: DINO) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert torch.equal(sa[key], sb[key]), key
        else:
            assert sa[key] == sb[key], key


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for name, value in a["state"][i].items():
            assert torch.equal(value, b["state"][i][name]), (i, name)


def test_one_teacher_update_per_optimizer_step_and_the_plain_loop_numbers():
    module = lightning_dino.DINOLightning(make_dino())
    versions = TeacherVersions()
    fit = trainer(versions)
    fit.fit(module, loader())

    assert fit.global_step == STEPS and module.dino.step == STEPS
    changes = [not torch.equal(x, y) for x, y in zip(versions.snapshots, versions.snapshots[1:])]
    assert len(changes) == STEPS * ACCUMULATE
    # Micro-batches 2, 4, 6, 8 end an accumulation: the teacher moves there and only there.
    assert changes == [False, True] * STEPS

    reference = make_dino()
    optimizer = plain_loop(reference)
    assert_same_state(module.dino, reference)
    assert_same_optimizer(fit.optimizers[0].state_dict(), optimizer.state_dict())


def test_resume_from_a_lightning_checkpoint_is_exact(tmp_path):
    whole = lightning_dino.DINOLightning(make_dino())
    uninterrupted = trainer()
    uninterrupted.fit(whole, loader())

    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    crashed = lightning_dino.DINOLightning(make_dino())
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(saver, CrashAt(2)).fit(crashed, loader())
    assert crashed.dino.step == 2

    # Built from another seed: everything that matters must come from the checkpoint.
    resumed = lightning_dino.DINOLightning(make_dino(seed=1))
    resuming = trainer()
    resuming.fit(resumed, loader(), ckpt_path=tmp_path / "step=2.ckpt")
    assert resuming.global_step == STEPS and resumed.dino.step == STEPS
    assert_same_state(resumed.dino, whole.dino)
    assert_same_optimizer(resuming.optimizers[0].state_dict(), uninterrupted.optimizers[0].state_dict())
