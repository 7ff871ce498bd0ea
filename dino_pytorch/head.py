"""DINOHead: MLP -> L2 normalisation -> weight-normalised prototypes."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from .validate import check_bool, check_positive_int, check_positive_ints

# Official checkpoints store the old `nn.utils.weight_norm` names; the parametrization stores the
# same two tensors (gain g, direction v) under these names.
_OFFICIAL_TO_PARAMETRIZED = {
    "last_layer.weight_g": "last_layer.parametrizations.weight.original0",
    "last_layer.weight_v": "last_layer.parametrizations.weight.original1",
}


def _trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        # Official bounds are absolute (+-2), i.e. about 100 sigma: effectively a plain normal.
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DINOHead(nn.Module):
    """The official DINO projection head, with the non-deprecated weight norm.

    ``x -> MLP (Linear-[BN]-GELU x (nlayers-1), Linear to bottleneck) -> L2 normalise -> last_layer``
    where ``last_layer`` is a bias-free ``Linear(bottleneck_dim, out_dim)`` under weight
    normalisation, ``W = g * v / ||v||`` row-wise.

    Init is official: trunc-normal(0.02) on MLP linears with zero bias; the last layer keeps
    PyTorch's default Linear init for v and g is filled with 1 (unit-norm prototypes). With
    ``norm_last_layer=True`` g is frozen, so the logits are cosines in [-1, 1].

    An official state_dict (``last_layer.weight_g`` / ``last_layer.weight_v``) loads directly;
    :meth:`official_state_dict` writes that layout back.

    Args:
        in_dim: the backbone's feature width.
        out_dim: K, the number of prototypes.
        use_bn: BatchNorm after each hidden linear of the MLP.
        norm_last_layer: freeze the gain g of the prototypes (unit-norm prototypes).
        nlayers: linear layers in the MLP, >= 1 (1: a single Linear to the bottleneck).
        hidden_dim: width of the MLP's hidden layers (unused with ``nlayers=1``).
        bottleneck_dim: width before the L2 normalisation.

    Raises:
        TypeError, ValueError: on a bad argument, naming it and the value given.

    Shapes:
        input: (N, in_dim) floating point; output: (N, out_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        in_dim, out_dim, hidden_dim, bottleneck_dim = check_positive_ints(
            in_dim=in_dim, out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim
        )
        nlayers = check_positive_int("nlayers", nlayers)
        use_bn = check_bool("use_bn", use_bn)
        norm_last_layer = check_bool("norm_last_layer", norm_last_layer)
        self.in_dim, self.out_dim = in_dim, out_dim
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        # Initialise before the last layer exists: it keeps the default Linear init, as official.
        self.apply(_trunc_normal_init)
        self.last_layer = parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        self.norm_last_layer = norm_last_layer
        if norm_last_layer:
            gain.requires_grad_(False)
        self._register_load_state_dict_pre_hook(self._map_official_keys)

    @staticmethod
    def _map_official_keys(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for old, new in _OFFICIAL_TO_PARAMETRIZED.items():
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)

    def official_state_dict(self) -> dict[str, Tensor]:
        """state_dict in the official layout (``last_layer.weight_g`` / ``weight_v``)."""
        inverse = {v: k for k, v in _OFFICIAL_TO_PARAMETRIZED.items()}
        return {inverse.get(k, k): v for k, v in self.state_dict().items()}

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The prototype parameters (g and v), e.g. to freeze during the first epoch."""
        return list(self.last_layer.parameters())

    def forward_bottleneck(self, x: Tensor) -> Tensor:
        """(N, in_dim) -> (N, bottleneck_dim): the MLP and the L2 normalisation, no last layer.

        For :func:`dino_pytorch.ops.fused_last_layer_cross_entropy`, which applies the last layer
        inside the loss; ``forward(x) == last_layer(forward_bottleneck(x))``.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x is a {type(x).__name__}, expected a (N, in_dim={self.in_dim}) floating-point tensor")
        if not x.is_floating_point():  # dtype and shape are metadata: no sync
            raise TypeError(f"x has dtype {x.dtype}, expected a (N, in_dim={self.in_dim}) floating-point tensor")
        if x.ndim < 1 or x.shape[-1] != self.in_dim:
            raise ValueError(
                f"DINOHead(in_dim={self.in_dim}) got an input of shape {tuple(x.shape)}: its last dimension "
                f"must equal in_dim={self.in_dim} (the backbone's feature width)"
            )
        x = self.mlp(x)
        # eps 1e-12 underflows to 0 in float16; 1e-6 is the smallest safe clamp there (as DINOv2).
        # Under autocast the norm runs in float32, so the official 1e-12 is kept there.
        half = x.dtype == torch.float16 and not torch.is_autocast_enabled(x.device.type)
        return F.normalize(x, dim=-1, p=2, eps=1e-6 if half else 1e-12)

    def last_layer_weights(self) -> tuple[Tensor, Tensor]:
        """``(v (out_dim, bottleneck_dim), g (out_dim, 1))`` of the weight-normalised last layer."""
        weight = self.last_layer.parametrizations.weight
        return weight.original1, weight.original0

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_dim) -> (N, out_dim) logits."""
        return self.last_layer(self.forward_bottleneck(x))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, norm_last_layer={self.norm_last_layer}"
