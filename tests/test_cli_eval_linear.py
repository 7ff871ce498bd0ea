"""dino-eval-linear: flags, official defaults, the data paths."""
from __future__ import annotations

import os

import pytest
import torch

from dino_pytorch.cli import eval_linear as linear_module
from dino_pytorch.cli._setup import bool_flag as str2bool


@pytest.mark.parametrize("text,value", [("true", True), ("False", False), ("1", True), ("0", False),
                                        ("on", True), ("off", False)])
def test_bool_flag(text, value):
    assert str2bool(text) is value
    args = linear_module.build_parser().parse_args(["--avgpool_patchtokens", text])
    assert args.avgpool_patchtokens is value


def test_cli_defaults_are_official():
    args = linear_module.build_parser().parse_args([])
    # The architecture comes from the checkpoint's stored configuration; None here, resolved to the
    # official vit_small/16 for files that store none (tests/test_cli_programs.py).
    assert (args.n_last_blocks, args.avgpool_patchtokens, args.arch, args.patch_size) == (4, False, None, None)
    assert (args.checkpoint_key, args.epochs, args.lr, args.batch_size_per_gpu, args.val_freq) == \
        ("teacher", 100, 0.001, 128, 1)
    assert args.num_labels is None and not args.precompute_features


def test_cli_tiny_vit_subset(tmp_path):
    result = linear_module.evaluate([
        "--arch", "vit_tiny", "--patch_size", "7", "--dataset", "fashion_mnist", "--subset", "40",
        "--n_last_blocks", "2", "--avgpool_patchtokens", "true", "--epochs", "2", "--lr", "0.01",
        "--device", "cpu", "--num_workers", "0", "--batch_size_per_gpu", "20", "--precompute_features",
        "--output_dir", str(tmp_path),
    ])
    assert result["feature_dim"] == 3 * 192 and result["classifier"].num_labels == 10
    assert os.path.isfile(tmp_path / "checkpoint.pth.tar") and os.path.isfile(tmp_path / "log.txt")
    state = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert state["state_dict"]["linear.weight"].shape == (10, 3 * 192)


def test_cli_augmented_path_convnet(tmp_path):
    result = linear_module.evaluate([
        "--arch", "convnet", "--dataset", "fashion_mnist", "--subset", "20", "--epochs", "1",
        "--device", "cpu", "--num_workers", "0", "--batch_size_per_gpu", "10", "--output_dir", str(tmp_path),
    ])
    assert result["feature_dim"] == 128 and result["lr"] == 0.001 * 10 / 256
    args = linear_module.build_parser().parse_args(["--official_interleave", "1", "--avgpool_patchtokens", "on"])
    assert args.official_interleave and args.avgpool_patchtokens


def test_cli_vit_only_flags_on_a_convnet_give_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        linear_module.main([
            "--arch", "convnet", "--dataset", "fashion_mnist", "--subset", "20", "--epochs", "1", "--device", "cpu",
            "--num_workers", "0", "--output_dir", str(tmp_path), "--avgpool_patchtokens", "true",
        ])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--avgpool_patchtokens true needs a ViT" in err[0] and "ConvNet" in err[0], err
