"""Optimizer pieces of the official recipe, without host syncs or per-step name scans."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from .validate import check_choice, check_float

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT


def get_params_groups(model: nn.Module, *, lr_scaled: Iterable[nn.Parameter] = (),
                      lr_scale: float = 1.0) -> list[dict]:
    """The official two groups: weight-decayed (ndim > 1, not a bias) and not (biases, 1-D).

    Only parameters that require grad are included. As official, ``cls_token``/``pos_embed`` and a
    trainable ``last_layer`` gain (ndim 2) land in the decayed group.

    With ``lr_scale != 1`` the parameters of ``lr_scaled`` (e.g. the backbone's) get two groups of
    their own after those two, by the same rule, each with ``"lr_scale": lr_scale`` (timm's key: the
    group's lr is the scheduled lr times it, :func:`set_schedules`). Every group then says whether
    the weight-decay schedule applies to it (``"regularized"``), so the decayed backbone group gets
    it as group 0 does: ``[decayed, not decayed, decayed scaled, not decayed scaled]``. With
    ``lr_scale == 1`` the two official groups are returned, exactly as without these arguments.
    """
    lr_scale = check_float("lr_scale", lr_scale, low=0.0)
    scaled = {id(p) for p in lr_scaled} if lr_scale != 1.0 else set()
    groups: list[list[nn.Parameter]] = [[], [], [], []]  # decayed, not, decayed scaled, not scaled
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = name.endswith(".bias") or param.ndim == 1
        groups[2 * (id(param) in scaled) + plain].append(param)
    official: list[dict[str, Any]] = [{"params": groups[0]}, {"params": groups[1], "weight_decay": 0.0}]
    if not scaled:
        return official
    official[0]["regularized"], official[1]["regularized"] = True, False
    return official + [{"params": groups[2], "lr_scale": lr_scale, "regularized": True},
                       {"params": groups[3], "weight_decay": 0.0, "lr_scale": lr_scale, "regularized": False}]


@contextlib.contextmanager
def frozen_parameters(parameters: Iterable[nn.Parameter]) -> Iterator[None]:
    """Within the block, ``parameters`` do not require grad (those that did are restored on exit).

    A forward run inside builds no graph through them: the backward neither computes nor stores
    their gradients (the head warm-up's frozen backbone costs no backward), and after the block
    they are trainable again, so an optimizer built over them is unaffected.
    """
    frozen = [p for p in parameters if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


@torch.no_grad()
def clip_gradients_(parameters: Iterable[nn.Parameter], clip: float) -> list[Tensor]:
    """Official per-parameter clip: each grad with norm n is scaled by min(1, clip / (n + 1e-6)).

    One foreach norm and one foreach multiply per (device, dtype); no ``.item()``, so no host
    sync (the official loop syncs once per parameter). Returns the per-parameter norms (tensors).
    Sharded gradients (FSDP2's DTensors) are clipped by their whole norm, from one all-reduce of
    the local squared norms (:func:`dino_pytorch.fsdp.global_norms`), and scaled shard by shard.
    """
    from .distributed import local_tensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return []
    if any(local_tensor(g) is not g for g in grads):
        from .fsdp import global_norms

        norms = global_norms(grads)
        grads = [local_tensor(g) for g in grads]
    else:
        norms = list(torch._foreach_norm(grads))
    coefs = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)
    return norms


def cancel_gradients_(parameters: Sequence[nn.Parameter]) -> None:
    """Drop the gradients of ``parameters`` (official last-layer freeze: AdamW then skips them).

    Takes the parameter list cached once (e.g. ``head.last_layer_parameters()``), instead of
    scanning parameter names for ``"last_layer"`` every step as the official loop does.
    """
    for p in parameters:
        p.grad = None


class LARS(torch.optim.Optimizer):
    """LARS as in the official DINO utils: for ndim != 1 params, decay then trust-ratio scaling.

    ``dp = g + wd * p``; ``dp *= eta * ||p|| / ||dp||`` (1 when either norm is 0); momentum buffer
    ``mu = momentum * mu + dp``; ``p -= lr * mu``. 1-D params get neither decay nor adaptation.
    """

    def __init__(self, params: ParamsT, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure: Optional[object] = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, (group["eta"] * param_norm / update_norm), one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])


def build_optimizer(name: str, params_groups: list[dict]) -> torch.optim.Optimizer:
    """``adamw`` (defaults), ``sgd`` (lr 0, momentum 0.9) or ``lars``; lr/wd are set per step."""
    check_choice("optimizer", name, ("adamw", "sgd", "lars"))
    if name == "adamw":
        return torch.optim.AdamW(params_groups)
    if name == "sgd":
        return torch.optim.SGD(params_groups, lr=0, momentum=0.9)
    return LARS(params_groups)


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Official per-step assignment: every group gets ``lr``; only group 0 gets ``weight_decay``.

    Groups of :func:`get_params_groups` with an lr scale get ``lr * group["lr_scale"]``, and those
    marked ``"regularized"`` get ``weight_decay`` (group 0 and the decayed backbone group).
    """
    # Plain floats: numpy scalars from the schedule arrays would make the optimizer's state_dict
    # unloadable with torch.load(weights_only=True).
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = float(lr) * group.get("lr_scale", 1.0)
        if group.get("regularized", i == 0):
            group["weight_decay"] = float(weight_decay)
