"""Collapse diagnostics: is the teacher uniform (all prototypes equal) or one-hot (one prototype)?

Both DINO collapse modes leave fingerprints in the teacher distribution P_t:
- uniform collapse: the entropy of each row approaches ln K and the loss sits at ln K;
- one-hot collapse: the batch-mean distribution concentrates on a handful of prototypes (its
  entropy falls under ln 4, or 2 prototypes or fewer win the argmax), however sharp the rows are.
Healthy training has sharp rows (low row entropy: 6.4 -> 1.5 nats in the 50-minute Fashion-MNIST
run) but a batch-mean distribution spread over many prototypes (~145 used there).

:func:`collapse_metrics` computes the numbers from what a step already has (the teacher targets and
the loss), as 0-dim tensors on their device: nothing waits for them until they are read.
:class:`CollapseMonitor` reads them at the caller's log points and says once, in one line, when a
collapse sets in, with the knobs that usually fix it.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .ops import row_entropy
from .validate import check_float, check_int, check_positive_int

UNIFORM_HINT = ("lower the teacher temperature (--teacher_temp / warm-up), raise the teacher momentum, "
                "lower the lr, or use a larger batch")
ONE_HOT_HINT = ("raise the teacher temperature or the centre momentum, add BatchNorm in the head "
                "(--use_bn_in_head), lower the lr, or use a larger out_dim / batch")


@torch.no_grad()
def collapse_metrics(teacher_probs: Tensor, center: Tensor, loss: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Health numbers of a batch of teacher targets (0-dim tensors; read them when logging).

    Args:
        teacher_probs: (N, K) teacher probabilities (rows sum to 1).
        center: (1, K) the loss centre.
        loss: the step's DINO loss, when known: adds the student-teacher KL and loss / ln K.

    Returns:
        ``teacher_entropy`` (mean row entropy, nats; ln K = uniform), ``teacher_mean_entropy`` (entropy
        of the batch-mean distribution; small = few prototypes take everything),
        ``teacher_kl_uniform`` (KL(mean row || uniform) = ln K - teacher_mean_entropy),
        ``center_norm`` (L2 norm of the centre), ``prototypes_used`` (distinct argmax prototypes, counted
        on the device), and with ``loss``: ``student_teacher_kl`` (the loss is the mean over view
        pairs of H(P_t) + KL(P_t || P_s), every teacher row in the same number of pairs, so the mean
        KL is the loss minus the mean teacher row entropy) and ``loss_over_ln_k``.
    """
    p = teacher_probs.float()
    k = p.shape[-1]
    entropy = row_entropy(p).mean()
    mean_entropy = row_entropy(p.mean(0))
    winners = torch.zeros(k, dtype=torch.bool, device=p.device).index_fill_(0, p.argmax(-1), True)
    metrics = {
        "teacher_entropy": entropy,
        "teacher_mean_entropy": mean_entropy,
        "teacher_kl_uniform": math.log(k) - mean_entropy,
        "center_norm": center.float().norm(),
        "prototypes_used": winners.sum().float(),
    }
    if loss is not None:
        loss = loss.detach().float()
        metrics["student_teacher_kl"] = loss - entropy
        metrics["loss_over_ln_k"] = loss / math.log(k)
    return metrics


@dataclass
class CollapseThresholds:
    """When :class:`CollapseMonitor` calls a collapse (all documented in docs/dino.md).

    Attributes:
        uniform_fraction: uniform collapse when, after ``warmup_steps``, the loss and the teacher row
            entropy both stay above ``uniform_fraction * ln K`` at every check over ``window`` steps.
        one_hot_entropy: one-hot collapse when the batch-mean teacher distribution's entropy is
            under this (nats; ln 4: fewer than ~4 prototypes effectively in use) ...
        one_hot_prototypes: ... or when this many prototypes or fewer win the argmax in a batch.
        warmup_steps: no verdict before this step (the teacher starts near uniform).
        window: steps the uniform condition must hold (at least two checks).
    """

    uniform_fraction: float = 0.9
    one_hot_entropy: float = math.log(4)
    one_hot_prototypes: int = 2
    warmup_steps: int = 0
    window: int = 100

    def __post_init__(self) -> None:
        check_float("uniform_fraction", self.uniform_fraction, low=0.0, high=1.0)
        check_float("one_hot_entropy", self.one_hot_entropy, low=0.0)
        check_int("one_hot_prototypes", self.one_hot_prototypes, 0)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_positive_int("window", self.window)


class CollapseMonitor:
    """Watches :func:`collapse_metrics` at log points; says once per kind when a collapse sets in.

    >>> monitor = CollapseMonitor(out_dim=65536, thresholds=CollapseThresholds(warmup_steps=500))
    >>> message = monitor.check(step, {k: v.item() for k, v in metrics.items()})   # at log points
    >>> if message: print(message)

    ``check`` takes host floats (the caller reads the device tensors where it syncs anyway) and
    returns the one-line warning the first time a kind of collapse is detected, else None. Records
    of which kinds fired are in ``fired``.
    """

    def __init__(self, out_dim: int, thresholds: Optional[CollapseThresholds] = None) -> None:
        self.ln_k = math.log(check_positive_int("out_dim", out_dim))
        self.thresholds = thresholds or CollapseThresholds()
        self.fired: dict[str, int] = {}
        self._recent: deque[tuple[int, bool]] = deque()

    def check(self, step: int, metrics: dict[str, float]) -> Optional[str]:
        t = self.thresholds
        if step < t.warmup_steps:
            return None
        messages = []
        if "one_hot" not in self.fired and (
            metrics["teacher_mean_entropy"] < t.one_hot_entropy or metrics["prototypes_used"] <= t.one_hot_prototypes
        ):
            self.fired["one_hot"] = step
            messages.append(
                f"one-hot collapse at step {step}: the batch-mean teacher distribution has entropy "
                f"{metrics['teacher_mean_entropy']:.2f} nats and {metrics['prototypes_used']:.0f} prototypes win the "
                f"argmax; {ONE_HOT_HINT}")
        high = min(metrics["loss_over_ln_k"], metrics["teacher_entropy"] / self.ln_k) > t.uniform_fraction
        self._recent.append((step, high))
        # Keep, as the oldest, the last check at or before the window's start.
        while len(self._recent) > 1 and self._recent[1][0] <= step - t.window:
            self._recent.popleft()
        covered = self._recent[0][0] <= step - t.window
        if "uniform" not in self.fired and covered and all(h for _, h in self._recent):
            self.fired["uniform"] = step
            messages.append(
                f"uniform collapse at step {step}: the loss and the teacher row entropy stayed above "
                f"{t.uniform_fraction:.0%} of ln K = {self.ln_k:.2f} for {t.window} steps; {UNIFORM_HINT}")
        return " | ".join(messages) or None
