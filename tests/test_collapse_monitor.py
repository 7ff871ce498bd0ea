"""Collapse monitor: numbers equal a naive float64 reference; each collapse is said once; a healthy
run says nothing."""
from __future__ import annotations

import math

import pytest
import torch

from dino_pytorch.diagnostics import CollapseMonitor, CollapseThresholds, collapse_metrics

K = 64


def naive(probs, loss):
    p = probs.double().tolist()
    n = len(p)
    row_h = sum(-sum(v * math.log(v) for v in row if v > 0) for row in p) / n
    mean = [sum(row[k] for row in p) / n for k in range(K)]
    mean_h = -sum(v * math.log(v) for v in mean if v > 0)
    winners = {max(range(K), key=lambda k: row[k]) for row in p}
    return {"teacher_entropy": row_h, "teacher_mean_entropy": mean_h, "teacher_kl_uniform": math.log(K) - mean_h,
            "prototypes_used": len(winners), "student_teacher_kl": loss - row_h, "loss_over_ln_k": loss / math.log(K)}


def batch(kind, step, seed=0):
    g = torch.Generator().manual_seed(seed + step)
    if kind == "uniform":
        logits = 0.01 * torch.randn(32, K, generator=g)
    elif kind == "one_hot":
        logits = torch.randn(32, K, generator=g)
        logits[:, 5] += 30.0
    else:  # healthy: sharp rows, many prototypes
        logits = 8.0 * torch.randn(32, K, generator=g)
    return torch.softmax(logits, dim=-1)


def test_metrics_equal_the_naive_reference():
    probs = batch("healthy", 0)
    loss = torch.tensor(3.25)
    got = collapse_metrics(probs, torch.ones(1, K), loss)
    for key, value in naive(probs, 3.25).items():
        assert got[key].item() == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert got["center_norm"].item() == pytest.approx(8.0)


def run(kind, steps=400, log_every=10):
    monitor = CollapseMonitor(K, CollapseThresholds(warmup_steps=50, window=100))
    said = []
    for step in range(0, steps, log_every):
        probs = batch(kind, step)
        entropy = -(probs * probs.log()).sum(-1).mean()
        loss = entropy + (0.05 if kind != "uniform" else 0.001)  # the loss sits near H(P_t) + small KL
        metrics = {k: v.item() for k, v in collapse_metrics(probs, torch.zeros(1, K), loss).items()}
        message = monitor.check(step, metrics)
        if message:
            said.append((step, message))
    return said, monitor


def test_uniform_collapse_is_said_once_after_the_window():
    said, monitor = run("uniform")
    assert len(said) == 1 and "uniform collapse" in said[0][1] and "teacher temperature" in said[0][1]
    assert said[0][0] >= 50 + 100  # after the warm-up, once the window is covered
    assert set(monitor.fired) == {"uniform"}


def test_one_hot_collapse_is_said_once():
    said, monitor = run("one_hot")
    assert len(said) == 1 and "one-hot collapse" in said[0][1] and "1 prototypes" in said[0][1]
    assert said[0][0] == 50 and set(monitor.fired) == {"one_hot"}


def test_a_healthy_run_says_nothing():
    said, _ = run("healthy")
    assert said == []


def test_thresholds_are_validated():
    with pytest.raises(ValueError, match="uniform_fraction=1.5"):
        CollapseThresholds(uniform_fraction=1.5)
    with pytest.raises(ValueError, match="window=0"):
        CollapseThresholds(window=0)


def test_the_training_log_says_a_collapse_once_and_records_it(tmp_path, capsys):
    import json

    from dino_pytorch.cli.train_report import RunLog

    run_log = RunLog(tmp_path, is_main=True, monitor=CollapseMonitor(K))
    for step in (10, 20):
        probs = batch("one_hot", step)
        metrics = {k: v.item() for k, v in collapse_metrics(probs, torch.zeros(1, K), torch.tensor(0.5)).items()}
        run_log.step({"step": step, "train_loss": 0.5, "lr": 1e-3, "momentum": 0.996, "teacher_temp": 0.04,
                      **metrics})
    warnings = [line for line in capsys.readouterr().err.splitlines() if "collapse" in line]
    assert len(warnings) == 1 and "one-hot collapse at step 10" in warnings[0]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "one-hot collapse" in records[0]["collapse"] and "collapse" not in records[1]
