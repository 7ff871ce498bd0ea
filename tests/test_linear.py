"""Linear probe: feature layouts, classifier init, the training recipe."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dino_pytorch.eval import LinearClassifier, train_linear_probe, vit_linear_features

B, TOKENS, D, DEPTH = 3, 5, 4, 6  # TOKENS = 1 CLS + 4 patches


class StubViT(nn.Module):
    """Block i's normed tokens are (i + 1) * x + i, with x (B, TOKENS * D) viewed as (B, TOKENS, D)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # something for the probe to leave alone

    def block(self, x, i):
        return self.scale * (i + 1) * x.view(x.shape[0], TOKENS, D) + i

    def get_intermediate_layers(self, x, n=1):
        return [self.block(x, i) for i in range(DEPTH - n, DEPTH)]

    def forward(self, x):
        return self.block(x, DEPTH - 1)[:, 0]


@pytest.fixture
def x():
    return torch.randn(B, TOKENS * D, generator=torch.Generator().manual_seed(0))


def test_cls_tokens_of_last_n_blocks_in_block_order(x):
    model = StubViT()
    feats = vit_linear_features(model, x, n_last_blocks=4)
    expected = torch.cat([model.block(x, i)[:, 0] for i in (2, 3, 4, 5)], dim=1)
    assert feats.shape == (B, 4 * D)
    torch.testing.assert_close(feats, expected, rtol=0, atol=0)
    torch.testing.assert_close(vit_linear_features(model, x, 1), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_avgpool_appends_last_block_patch_mean(x, n):
    model = StubViT()
    feats = vit_linear_features(model, x, n_last_blocks=n, avgpool_patchtokens=True)
    last = model.block(x, DEPTH - 1)
    cls = torch.cat([model.block(x, i)[:, 0] for i in range(DEPTH - n, DEPTH)], dim=1)
    avg = last[:, 1:].mean(dim=1)
    assert feats.shape == (B, (n + 1) * D)
    torch.testing.assert_close(feats, torch.cat([cls, avg], dim=1), rtol=0, atol=0)


def test_official_interleave_for_n1_by_hand(x):
    model = StubViT()
    last = model.block(x, DEPTH - 1)
    cls, avg = last[:, 0], last[:, 1:].mean(dim=1)
    expected = torch.empty(B, 2 * D)
    for b in range(B):
        for i in range(D):
            expected[b, 2 * i] = cls[b, i]
            expected[b, 2 * i + 1] = avg[b, i]
    feats = vit_linear_features(model, x, 1, True, official_interleave=True)
    torch.testing.assert_close(feats, expected, rtol=0, atol=0)
    # Same numbers as the concatenated layout, permuted.
    concat = vit_linear_features(model, x, 1, True)
    torch.testing.assert_close(feats, concat.view(B, 2, D).transpose(1, 2).reshape(B, -1), rtol=0, atol=0)


def test_official_interleave_errors(x):
    with pytest.raises(ValueError, match="n_last_blocks=4"):
        vit_linear_features(StubViT(), x, 4, True, official_interleave=True)
    with pytest.raises(ValueError, match="avgpool_patchtokens=True"):
        vit_linear_features(StubViT(), x, 1, False, official_interleave=True)
    with pytest.raises(ValueError, match="n_last_blocks=0"):
        vit_linear_features(StubViT(), x, 0)


def test_non_vit_models_use_forward(x):
    model = nn.Linear(TOKENS * D, 7)
    with torch.no_grad():
        torch.testing.assert_close(vit_linear_features(model, x, 4), model(x))


@pytest.mark.parametrize("flags", [{"avgpool_patchtokens": True}, {"official_interleave": True}])
def test_non_vit_models_refuse_the_patch_token_flags(x, flags):
    """A model without patch tokens cannot average them: the flag was silently ignored, now it raises."""
    name = next(iter(flags))
    with pytest.raises(ValueError, match=rf"{name}=True, but the model \(Linear\) has no get_intermediate_layers"):
        vit_linear_features(nn.Linear(TOKENS * D, 7), x, 4, **flags)


def test_linear_classifier_init_and_flatten():
    torch.manual_seed(0)
    clf = LinearClassifier(2000, 500)
    w = clf.linear.weight.detach()
    assert abs(float(w.mean())) < 1e-4 and abs(float(w.std()) - 0.01) < 1e-4
    assert torch.count_nonzero(clf.linear.bias) == 0
    assert LinearClassifier(6, 2)(torch.randn(4, 2, 3)).shape == (4, 2)
    with pytest.raises(ValueError, match="num_labels=0"):
        LinearClassifier(6, 0)


def separable(n, num_classes=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    x = 3.0 * nn.functional.one_hot(labels, dim).float() + 0.5 * torch.randn(n, dim, generator=g)
    return TensorDataset(x, labels)


def test_probe_learns_separable_problem_with_precomputed_features(tmp_path):
    torch.manual_seed(0)
    train = DataLoader(separable(512), batch_size=64, shuffle=False)
    val = DataLoader(separable(256, seed=1), batch_size=100)
    path = str(tmp_path / "checkpoint.pth.tar")
    result = train_linear_probe(nn.Identity(), train, val, num_labels=4, epochs=4, lr=1.0,
                                precompute_features=True, checkpoint_path=path)
    assert result["final_top1"] > 95.0 and result["best_top1"] >= result["final_top1"]
    assert result["final_top5"] == 100.0  # 4 classes: top-min(5, 4) always hits
    assert result["feature_dim"] == 8 and result["lr"] == 1.0 * 64 / 256
    # Cosine annealing to 0 over the epochs, stepped once per epoch.
    lrs = [h["lr"] for h in result["history"]]
    expected = [0.25 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert lrs == pytest.approx(expected)
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 4 and state["best_acc"] == result["best_top1"]
    # The logged accuracy is the saved classifier's, recomputed here by hand (features = inputs).
    x, y = val.dataset.tensors
    weights = {k: v.double() for k, v in state["state_dict"].items()}
    logits = x.double() @ weights["linear.weight"].t() + weights["linear.bias"]
    assert result["final_top1"] == pytest.approx(100.0 * (logits.argmax(1) == y).double().mean().item(), abs=1e-9)
    assert set(state["state_dict"]) == {"linear.weight", "linear.bias"}
    assert {"optimizer", "scheduler"} <= set(state)


def test_probe_on_vit_features_freezes_backbone():
    model = StubViT().train()
    before = model.scale.detach().clone()
    data = TensorDataset(torch.randn(24, TOKENS * D), torch.randint(0, 3, (24,)))
    val_freq_epochs = []
    result = train_linear_probe(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8), 3,
                                epochs=3, n_last_blocks=2, avgpool_patchtokens=True, val_freq=2,
                                log=lambda s: val_freq_epochs.append("val_top1" in s))
    assert result["feature_dim"] == 3 * D and result["classifier"].linear.in_features == 3 * D
    assert val_freq_epochs == [True, False, True]  # every val_freq epochs and the last one
    assert torch.equal(model.scale, before) and model.scale.grad is None and model.training


def naive_topk_accuracy(logits, labels, k):
    hits = 0
    for row, label in zip(logits.tolist(), labels.tolist()):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        hits += label in order[:k]
    return 100.0 * hits / len(labels)


def test_logged_val_metrics_equal_recomputation_from_saved_classifier(tmp_path):
    # Noisy labels over 7 classes: accuracies strictly between 0 and 100, top-5 differs from top-1.
    torch.manual_seed(0)
    model = StubViT()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, TOKENS * D, generator=g)
    y = torch.randint(0, 7, (40,), generator=g)
    train, val = DataLoader(TensorDataset(x[:24], y[:24]), batch_size=8), DataLoader(TensorDataset(x[24:], y[24:]),
                                                                                     batch_size=5)
    path = str(tmp_path / "probe.pth")
    logged = []
    result = train_linear_probe(model, train, val, 7, epochs=2, lr=5.0, n_last_blocks=2, avgpool_patchtokens=True,
                                checkpoint_path=path, log=logged.append)
    state = torch.load(path, weights_only=True)["state_dict"]
    # Features by hand: CLS of blocks 4 and 5, then the mean of block 5's patch tokens.
    xv, yv = x[24:].double(), y[24:]
    tokens = [model.block(xv, i).detach() for i in (4, 5)]
    feats = torch.cat([tokens[0][:, 0], tokens[1][:, 0], tokens[1][:, 1:].mean(dim=1)], dim=1)
    logits = feats @ state["linear.weight"].double().t() + state["linear.bias"].double()
    top1, top5 = naive_topk_accuracy(logits, yv, 1), naive_topk_accuracy(logits, yv, 5)
    loss = -torch.log_softmax(logits, dim=1)[torch.arange(len(yv)), yv].mean().item()
    assert 0 < top1 < top5 < 100  # the case can tell the metrics apart
    assert logged[-1]["val_top1"] == pytest.approx(top1, abs=1e-9) == result["final_top1"]
    assert logged[-1]["val_top5"] == pytest.approx(top5, abs=1e-9) == result["final_top5"]
    assert logged[-1]["val_loss"] == pytest.approx(loss, rel=1e-5)


def test_probe_argument_errors():
    data = DataLoader(separable(8), batch_size=4)
    with pytest.raises(ValueError, match="epochs=0"):
        train_linear_probe(nn.Identity(), data, data, 4, epochs=0)
    with pytest.raises(ValueError, match="batch_size_for_lr"):
        train_linear_probe(nn.Identity(), [next(iter(data))], data, 4, epochs=1)


def test_real_vit_last_cls_is_forward():
    from dino_pytorch.models import create_model

    torch.manual_seed(0)
    vit = create_model("vit_tiny", patch_size=7, in_chans=1, img_size=28, depth=3).eval()
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        feats = vit_linear_features(vit, images, n_last_blocks=3, avgpool_patchtokens=True)
        layers = vit.get_intermediate_layers(images, 3)
        torch.testing.assert_close(feats[:, 2 * 192: 3 * 192], vit(images))
    torch.testing.assert_close(feats[:, 3 * 192:], layers[-1][:, 1:].mean(dim=1))


def test_labels_are_read_on_the_cpu_only():
    """Out-of-range labels are named from CPU batches; labels elsewhere (a GPU: reading them would
    synchronise every batch; here the meta device, which has no values) are not read."""
    from dino_pytorch.eval.linear import _check_labels

    with pytest.raises(ValueError, match=r"train_loader yielded the label 9 in batch 3.*num_labels=2"):
        _check_labels(torch.tensor([0, 9, 1]), 2, "train_loader", 3)
    _check_labels(torch.full((3,), 9, device="meta"), 2, "train_loader", 3)
