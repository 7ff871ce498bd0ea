"""Untrusted files: payloads never run on any loading path, each refusal names the offending global
and says it can run code, no message recommends trusting; genuine official checkpoints need no flag."""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch

from dino_pytorch import DINOHead, MultiCropWrapper
from dino_pytorch.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_into,
    load_official_weights,
    official_state_dict,
    read_checkpoint,
)
from dino_pytorch.cli import eval_knn, eval_linear, train, visualize_attention
from dino_pytorch.models import vit_tiny

SYSTEM = f"{os.system.__module__}.system"  # posix.system on Linux


class Payload:
    """Unpickling runs ``os.system("touch <marker>")``: a harmless stand-in for an attack."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tiny_vit():
    return vit_tiny(patch_size=4, img_size=28, in_chans=1, depth=2)


def official_layout(student_state, teacher_state):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    optimizer.param_groups[0]["lr"] = np.linspace(0.0, 0.1, 5)[2]  # numpy float64, as main_dino.py
    return {
        "student": {f"module.{k}": v for k, v in student_state.items()},
        "teacher": teacher_state,
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=4, out_dim=16, global_crops_scale=(0.4, 1.0)),
        "dino_loss": {"center": torch.zeros(1, 16)},
    }


def genuine_state():
    torch.manual_seed(0)
    wrapper = MultiCropWrapper(tiny_vit(), DINOHead(192, 16, hidden_dim=32, bottleneck_dim=8))
    return official_state_dict(wrapper.state_dict())


def payload_file(tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = Payload(marker)
    state = genuine_state()
    if kind == "alone":
        content = payload
    elif kind == "beside_weights":
        content = {"w": torch.ones(2), "extra": payload}
    elif kind == "after_namespace":
        content = official_layout(state, state)
        content["zz_after_args"] = payload  # pickled after the allowlisted Namespace
    else:  # nested in a state dict
        content = official_layout(state, dict(state, nested={"deeper": [payload]}))
    path = tmp_path / f"{kind}.pth"
    torch.save(content, path)
    return path, marker


KINDS = ["alone", "beside_weights", "after_namespace", "nested"]


def assert_refusal(message, tmp_path):
    message = message.replace(str(tmp_path), "<tmp>")
    assert SYSTEM in message and "can run code" in message, message
    assert "trusted" not in message and "weights_only=False" not in message, message


LIBRARY_LOADERS = {
    "load_checkpoint": lambda p: load_checkpoint(p),
    "read_checkpoint": lambda p: read_checkpoint(p),
    "load_official_weights": lambda p: load_official_weights(p),
    "load_into": lambda p: load_into(tiny_vit(), None, p),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loader", sorted(LIBRARY_LOADERS))
def test_library_refuses_payloads(tmp_path, kind, loader):
    path, marker = payload_file(tmp_path, kind)
    with pytest.raises(CheckpointError) as info:
        LIBRARY_LOADERS[loader](path)
    assert_refusal(str(info.value), tmp_path)
    assert not marker.exists()


def _program_args(name, path, tmp_path):
    common = ["--device", "cpu"]
    if name == "dino-eval-knn":
        return eval_knn.main, ["--pretrained_weights", str(path), "--dataset", "fashion_mnist", *common]
    if name == "dino-eval-linear":
        return eval_linear.main, ["--pretrained_weights", str(path), "--dataset", "fashion_mnist",
                                  "--output_dir", str(tmp_path / "lin"), *common]
    if name == "dino-visualize-attention":
        return visualize_attention.main, ["--pretrained_weights", str(path), "--fashion_mnist_index", "0",
                                          "--output_dir", str(tmp_path / "att"), *common]
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    os.replace(path, out / "checkpoint.pth")  # dino-train resumes from output_dir/checkpoint.pth
    return train.main, ["--dataset", "fashion_mnist", "--arch", "convnet", "--width", "4", "--out_dim", "16",
                        "--hidden_dim", "16", "--bottleneck_dim", "8", "--batch_size_per_gpu", "8",
                        "--local_crops_number", "0", "--max_steps", "1", "--num_workers", "0", "--no_final_knn",
                        "--no_progress", "--attention_maps", "0", "--output_dir", str(out), *common]


PROGRAMS = ["dino-eval-knn", "dino-eval-linear", "dino-visualize-attention", "dino-train"]


@pytest.mark.parametrize("kind", ["after_namespace", "nested"] + ["alone", "beside_weights"])
@pytest.mark.parametrize("program", PROGRAMS)
def test_programs_refuse_payloads_in_one_line(tmp_path, capsys, program, kind):
    path, marker = payload_file(tmp_path, kind)
    main, argv = _program_args(program, path, tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"{program}: error:"), err
    assert_refusal(err, tmp_path)
    assert not marker.exists()


# ------------------------------------------------------------------------ genuine official files

@pytest.fixture
def official(tmp_path):
    state = genuine_state()
    path = tmp_path / "official.pth"
    torch.save(official_layout(state, state), path)
    assert any(k.endswith("last_layer.weight_g") for k in state)
    return path


def test_genuine_official_checkpoint_needs_no_trust_in_the_library(official, recwarn):
    assert isinstance(read_checkpoint(official)["args"], argparse.Namespace)
    assert load_checkpoint(official)["epoch"] == 3
    backbone_state, head_state = load_official_weights(official)
    assert "last_layer.weight_g" in head_state and "last_layer.weight_v" in head_state
    load_into(tiny_vit(), DINOHead(192, 16, hidden_dim=32, bottleneck_dim=8), official)
    assert not [w for w in recwarn if "weights_only" in str(w.message)]


ARCH = ["--arch", "vit_tiny", "--patch_size", "4", "--vit_depth", "2", "--in_chans", "1", "--img_size", "28"]


@pytest.mark.parametrize("program", ["dino-eval-knn", "dino-eval-linear", "dino-visualize-attention"])
def test_genuine_official_checkpoint_needs_no_trust_in_the_programs(official, tmp_path, capsys, program):
    data = ["--dataset", "fashion_mnist", "--subset", "16", "--num_workers", "0", "--device", "cpu"]
    if program == "dino-eval-knn":
        eval_knn.main(["--pretrained_weights", str(official), *ARCH, *data, "--nb_knn", "2"])
    elif program == "dino-eval-linear":
        eval_linear.main(["--pretrained_weights", str(official), *ARCH, *data, "--epochs", "1",
                          "--n_last_blocks", "1", "--precompute_features", "--output_dir", str(tmp_path / "lin")])
    else:
        pytest.importorskip("matplotlib")
        visualize_attention.main(["--pretrained_weights", str(official), "--arch", "vit_tiny",
                                  "--fashion_mnist_index", "0", "--image_size", "28", "28",
                                  "--output_dir", str(tmp_path / "att"), "--device", "cpu"])
    assert "Loaded" in capsys.readouterr().out or program == "dino-visualize-attention"
