"""dino-eval-knn: feature dumps, the data path, architectures, checkpoints with and without config."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dino_pytorch.cli import eval_knn
from dino_pytorch.eval import knn as knn_module
from dino_pytorch.eval import knn_eval
from test_knn import clustered


def test_cli_load_features(tmp_path, capsys):
    train, train_labels, test, test_labels = clustered(80, 30, 4, seed=2)
    knn_module.save_features(str(tmp_path), (train, train_labels), (test, test_labels))
    assert sorted(os.listdir(tmp_path)) == sorted(knn_module._FEATURE_FILES)
    results = eval_knn.evaluate(["--load_features", str(tmp_path), "--nb_knn", "1", "5", "20",
                               "--temperature", "0.1", "--device", "cpu"])
    assert results == knn_eval(train, train_labels, test, test_labels, ks=(1, 5, 20), T=0.1)
    out = capsys.readouterr().out
    assert "5-NN classifier result: Top1:" in out


def test_cli_load_features_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.evaluate(["--load_features", str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "testfeat.pth" in err and len(err.strip().splitlines()) == 1


def test_cli_extracts_dumps_and_reloads(tmp_path, monkeypatch):
    """The data path of the CLI, with a small ConvNet standing in for create_model."""
    from dino_pytorch.cli import _setup
    from dino_pytorch.models import ConvNet

    torch.manual_seed(0)
    monkeypatch.setattr(_setup, "backbone_from_flags", lambda config: ConvNet(width=4, stages=2).eval())
    argv = ["--dataset", "fashion_mnist", "--subset", "64", "--nb_knn", "1", "10", "--device", "cpu",
            "--num_workers", "0", "--batch_size_per_gpu", "25"]
    first = eval_knn.evaluate(argv + ["--dump_features", str(tmp_path)])
    (train_f, train_l), (test_f, test_l) = knn_module.load_features(str(tmp_path))
    assert train_f.shape == (64, 8) and test_f.shape == (64, 8)
    torch.testing.assert_close(train_f.norm(dim=1), torch.ones(64))
    from dino_pytorch.datasets import FashionMNIST

    assert torch.equal(train_l, FashionMNIST(train=True).labels[:64])
    assert torch.equal(test_l, FashionMNIST(train=False).labels[:64])
    assert eval_knn.evaluate(["--load_features", str(tmp_path), "--nb_knn", "1", "10", "--device", "cpu"]) == first


@pytest.mark.parametrize("arch,dim", [("convnet", 128), ("resnet18", 512)])
def test_cli_non_vit_archs(arch, dim, tmp_path):
    # resnet18 takes 3 channels: the grey images are repeated; its fc is replaced by Identity.
    from dino_pytorch.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST
    from dino_pytorch.models import create_model

    torch.manual_seed(0)
    kwargs = {"in_chans": 1, "width": 32, "pool": 1} if arch == "convnet" else {}
    model = create_model(arch, **kwargs)
    if arch == "resnet18":
        model.fc = torch.nn.Identity()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ckpt.pth")
    eval_knn.evaluate(["--arch", arch, "--dataset", "fashion_mnist", "--subset", "16", "--nb_knn", "3",
                     "--pretrained_weights", str(tmp_path / "ckpt.pth"), "--device", "cpu", "--num_workers", "0",
                     "--dump_features", str(tmp_path / "feats")])
    (train_f, train_l), (test_f, _) = knn_module.load_features(str(tmp_path / "feats"))
    assert train_f.shape == (16, dim) and test_f.shape == (16, dim)
    # Values: the dump equals F.normalize(model(x)) computed directly on the normalised images.
    data = FashionMNIST(train=True)
    images = (data.images[:16].float() / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    if arch == "resnet18":
        images = images.expand(-1, 3, -1, -1)
    with torch.no_grad():
        expected = F.normalize(model.eval()(images), dim=1)
    torch.testing.assert_close(train_f, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(train_l, data.labels[:16])


def test_cli_full_with_tiny_vit_and_weights(tmp_path):
    """Weights saved as a training checkpoint's teacher load, and the dump equals a direct extraction."""
    from dino_pytorch.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST
    from dino_pytorch.models import create_model

    torch.manual_seed(0)
    vit = create_model("vit_tiny", patch_size=7, in_chans=1, img_size=28, num_classes=0)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}, tmp_path / "ckpt.pth")
    results = eval_knn.evaluate([
        "--arch", "vit_tiny", "--patch_size", "7", "--dataset", "fashion_mnist", "--subset", "40",
        "--pretrained_weights", str(tmp_path / "ckpt.pth"), "--nb_knn", "5", "--device", "cpu",
        "--num_workers", "0", "--batch_size_per_gpu", "20", "--dump_features", str(tmp_path / "feats"),
    ])
    top1, top5 = results[5]
    assert 0.0 <= top1 <= top5 <= 100.0
    (train_f, train_l), _ = knn_module.load_features(str(tmp_path / "feats"))
    data = FashionMNIST(train=True)
    images = (data.images[:40].float() / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    with torch.no_grad():
        expected = F.normalize(vit.eval()(images), dim=1)
    torch.testing.assert_close(train_f, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(train_l, data.labels[:40])
