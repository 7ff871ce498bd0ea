"""dino-train with DINOv2's recipe: the flags (iBOT, masks, centring, registers, layer-scale) and their
one-line checks, the loss parts in metrics.jsonl, the self-describing checkpoint of a DINOv2 ViT that
the evaluation programs rebuild, and a bit-identical resume of an iBOT run.

The slow tests share one set of short runs (module fixtures): a 6-step run, and the same run killed
right after its step-3 checkpoint and resumed.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino_pytorch import DINO
from dino_pytorch.cli import train
from dino_pytorch.cli._setup import UsageError, config_from_flags, image_channels
from dino_pytorch.cli.train_checkpoint import check_same_ibot
from dino_pytorch.cli.train_flags import get_args_parser, ibot_config, resolve_defaults
from dino_pytorch.eval import vit_linear_features
from dino_pytorch.ibot import IBOTConfig
from dino_pytorch.model_config import build_backbone, is_vit
from dino_pytorch.models import DinoVisionTransformer, dinov2_vit_small
from train_cases import load, run

ROOT = Path(__file__).resolve().parents[1]
IBOT = ["--arch", "dinov2_vit_small", "--patch_size", "4", "--ibot_weight", "1"]
# A 2-block, 24-wide DINOv2 ViT-S (6 heads of 4) with 2 registers and layer-scale, drop path on (the
# resume must not depend on the RNG's history), iBOT + KoLeo + Sinkhorn-Knopp, AdamW at a real lr.
RUN = [
    "--dataset", "fashion_mnist", *IBOT, "--vit_depth", "2", "--vit_embed_dim", "24", "--num_register_tokens", "2",
    "--layerscale", "1e-5", "--drop_path_rate", "0.1", "--mask_probability", "0.75", "--koleo_weight", "0.1",
    "--centering", "sinkhorn_knopp", "--out_dim", "64", "--ibot_out_dim", "48", "--hidden_dim", "32",
    "--bottleneck_dim", "16", "--batch_size_per_gpu", "8", "--local_crops_number", "2", "--num_workers", "0",
    "--no_final_knn", "--no_progress", "--log_every", "2", "--warmup_epochs", "0", "--freeze_last_layer", "0",
    "--lr", "0.01", "--max_steps", "6", "--attention_maps", "1", "--save_every_min", "0", "--saveckp_freq", "0",
]


def parse(*argv):
    args = get_args_parser().parse_args(["--dataset", "fashion_mnist", *argv])
    resolve_defaults(args, torch.device("cpu"), announce=False)
    return args


# ---------------------------------------------------------------------------------- flags (fast)

@pytest.mark.parametrize("argv, words", [
    (["--arch", "convnet", "--ibot_weight", "1"], ["--ibot_weight 1.0", "iBOT needs a dinov2_vit_* arch", "convnet"]),
    (["--arch", "vit_small", "--num_register_tokens", "4"], ["--num_register_tokens 4", "dinov2_vit_*", "vit_small"]),
    (["--arch", "convnet", "--layerscale", "1e-5"], ["--layerscale 1e-05", "dinov2_vit_*"]),
    ([*IBOT, "--layerscale", "0"], ["--layerscale 0.0", "> 0"]),
    ([*IBOT, "--ibot_weight", "-1"], ["--ibot_weight -1.0", ">= 0"]),
    ([*IBOT, "--ibot_weight", "nan"], ["--ibot_weight nan"]),
    ([*IBOT, "--ibot_out_dim", "0"], ["--ibot_out_dim 0", "positive int"]),
    ([*IBOT, "--mask_probability", "1.5"], ["--mask_probability 1.5", "[0, 1]"]),
    ([*IBOT, "--mask_ratio", "0.5", "0.1"], ["--mask_ratio 0.5 0.1", "low <= high"]),
    ([*IBOT, "--mask_ratio", "0.1"], ["--mask_ratio 0.1", "two numbers"]),
    ([*IBOT, "--mask_ratio", "0.1", "1.5"], ["--mask_ratio 0.1 1.5", "[0, 1]"]),
    ([*IBOT, "--num_register_tokens", "-1"], ["--num_register_tokens -1", "int >= 0"]),
    (["--arch", "dinov2_vit_small", "--patch_size", "4", "--mask_probability", "0.3"],
     ["--mask_probability 0.3", "iBOT is off", "--ibot_weight"]),
    ([*IBOT, "--ibot_head", "shared", "--ibot_out_dim", "32"], ["--ibot_out_dim 32", "--ibot_head shared"]),
    ([*IBOT, "--fused_head_loss", "true"], ["--fused_head_loss True", "--ibot_weight 1.0"]),
    (["--arch", "dinov2_vit_small", "--patch_size", "7"], ["--local_crop_size 16", "multiple of --patch_size 7"]),
    (["--arch", "dinov2_vit_small"], ["--global_crop_size 28", "multiple of --patch_size 16"]),
])
def test_a_bad_dinov2_flag_is_one_line_naming_it(argv, words, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--dataset", "fashion_mnist", *argv, "--output_dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dino-train: error: "), lines
    assert all(word in lines[0] for word in words), lines[0]
    assert not (tmp_path / "out").exists()  # refused before any work


def test_the_flags_make_the_ibot_config_and_the_dinov2_model_config():
    assert ibot_config(parse("--arch", "dinov2_vit_small", "--patch_size", "4")) is None  # --ibot_weight 0: off
    args = parse(*IBOT, "--num_register_tokens", "4", "--layerscale", "1e-5", "--vit_depth", "2",
                 "--vit_embed_dim", "48", "--mask_ratio", "0.2", "0.4", "--seed", "7")
    assert ibot_config(args) == IBOTConfig(weight=1.0, head="separate", mask_probability=0.5, mask_ratio=(0.2, 0.4),
                                           out_dim=None, seed=7)
    assert args.centering == "centering" and image_channels("fashion_mnist", "dinov2_vit_small") == 1
    config = config_from_flags(args, "fashion_mnist", args.in_chans, args.global_crop_size)
    assert config["arch"] == "dinov2_vit_small" and is_vit(config)
    assert config["backbone_kwargs"] == {"patch_size": 4, "in_chans": 1, "img_size": 28, "drop_path_rate": 0.1,
                                         "depth": 2, "embed_dim": 48, "num_register_tokens": 4, "init_values": 1e-5}
    model = build_backbone(config)
    assert isinstance(model, DinoVisionTransformer)
    assert (model.patch_size, model.in_chans, model.depth, model.embed_dim) == (4, 1, 2, 48)
    assert (model.num_register_tokens, model.init_values, model.pos_embed.shape[1]) == (4, 1e-5, 1 + 7 * 7)
    plain = config_from_flags(parse("--arch", "dinov2_vit_small", "--patch_size", "4"), "fashion_mnist", 1, 28)
    assert plain["backbone_kwargs"]["num_register_tokens"] == 0 and plain["backbone_kwargs"]["init_values"] is None


def tiny_dino(ibot):
    torch.manual_seed(0)
    backbone = dinov2_vit_small(img_size=16, patch_size=4, in_chans=1, embed_dim=24, depth=1, num_heads=2)
    return DINO(backbone, out_dim=16, hidden_dim=16, bottleneck_dim=8, input_size=(1, 16, 16),
                ibot=IBOTConfig(head="shared") if ibot else None)


def test_a_resume_must_keep_ibot_on_or_off(tmp_path):
    # With a shared patch head the networks are the same with and without iBOT: the centre entry tells.
    with_ibot, without = tiny_dino(True), tiny_dino(False)
    saved = with_ibot.official_checkpoint(None, 0, args={"ibot_weight": 1.0})
    check_same_ibot(saved, with_ibot, tmp_path)
    with pytest.raises(UsageError, match=r"trained with iBOT \(--ibot_weight 1.0\), and this run has --ibot_weight 0"):
        check_same_ibot(saved, without, tmp_path)
    with pytest.raises(UsageError, match="trained without iBOT, and this run has --ibot_weight 1.0"):
        check_same_ibot(without.official_checkpoint(None, 0), with_ibot, tmp_path)


def test_collapse_metrics_read_the_dino_part_of_the_loss():
    dino = tiny_dino(True)
    dino.koleo_weight = 0.1
    views = [torch.randn(4, 1, 16, 16) for _ in range(2)] + [torch.randn(4, 1, 8, 8)]
    loss = dino(views)
    parts = dino.loss_parts
    assert set(parts) == {"dino_loss", "ibot_loss", "koleo_loss"}
    assert torch.allclose(loss.detach(), parts["dino_loss"] + parts["ibot_loss"] + 0.1 * parts["koleo_loss"])
    assert train.loss_parts(dino) == pytest.approx({k: v.item() for k, v in parts.items()})
    assert dino.collapse_metrics()["loss_over_ln_k"].item() == pytest.approx(parts["dino_loss"].item() / math.log(16))


def test_the_linear_probe_reads_the_cls_token_of_a_dinov2_vit():
    torch.manual_seed(0)
    model = dinov2_vit_small(img_size=16, patch_size=4, in_chans=1, embed_dim=24, depth=3, num_heads=2,
                             num_register_tokens=2, init_values=1e-5).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out = model.forward_features(x)
        one = vit_linear_features(model, x, 1, avgpool_patchtokens=True)
        two = vit_linear_features(model, x, 2)
    assert torch.allclose(one, torch.cat((out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1)), dim=1),
                          atol=1e-6)
    assert two.shape == (3, 48) and torch.allclose(two[:, 24:], out["x_norm_clstoken"], atol=1e-6)


def test_attention_maps_of_a_vit_with_registers_leave_the_registers_out():
    from dino_pytorch.attention import attention_maps

    torch.manual_seed(0)
    model = dinov2_vit_small(img_size=16, patch_size=4, in_chans=1, embed_dim=24, depth=1, num_heads=2,
                             num_register_tokens=3)
    image = torch.randn(1, 16, 12)
    maps = attention_maps(model, image)
    with torch.no_grad():
        attn = model.eval().get_last_selfattention(image.unsqueeze(0))  # (1, heads, 1 + 3 + 12, ...)
    assert maps.shape == (2, 4, 3)
    assert torch.equal(maps, attn[0, :, 0, 4:].reshape(2, 4, 3))


# ----------------------------------------------------------------------------- runs (slow)

def program(module, *args):
    return subprocess.run([sys.executable, "-m", f"dino_pytorch.cli.{module}", *map(str, args)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run(RUN + ["--output_dir", str(out)])
    return out


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("resumed")
    flags = RUN + ["--output_dir", str(out), "--save_every_steps", "3"]
    killed = run(flags, env={"CRASH_AFTER_STEP": "3"}, module=(str(ROOT / "tests" / "crash_after_save.py"),),
                 check=False)
    assert killed.returncode == 17 and load(out / "checkpoint.pth")["step"] == 3  # died after the step-3 save
    assert "at step 3" in run(flags).stdout
    return out


@pytest.mark.slow
def test_an_ibot_run_resumes_bit_identically(straight, resumed):
    a, b = load(straight / "checkpoint.pth"), load(resumed / "checkpoint.pth")
    assert a["step"] == b["step"] == 6
    for key in ("student", "teacher", "dino_loss", "ibot_loss"):
        assert a[key].keys() == b[key].keys() and a[key]
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    assert any(name.startswith("patch_head.") for name in a["student"])  # the separate patch head was trained
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        for entry in sa[i]:
            assert torch.equal(sa[i][entry], sb[i][entry]), f"optimizer.state[{i}].{entry} differs"


@pytest.mark.slow
def test_the_loss_parts_are_logged_and_plotted(straight):
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6]
    for r in steps:  # the last micro-batch's loss and its parts: total = DINO + 1 * iBOT + 0.1 * KoLeo
        assert all(math.isfinite(r[k]) for k in ("dino_loss", "ibot_loss", "koleo_loss"))
        assert r["train_loss"] == pytest.approx(r["dino_loss"] + r["ibot_loss"] + 0.1 * r["koleo_loss"], rel=1e-5)
        assert r["loss_over_ln_k"] == pytest.approx(r["dino_loss"] / math.log(64), rel=1e-5)
    assert (straight / "curves.png").stat().st_size > 0
    assert (straight / "attention" / "000" / "attn-head5.png").exists()  # 6 heads, registers left out


@pytest.mark.slow
def test_the_checkpoint_describes_the_dinov2_vit(straight):
    ckpt = load(straight / "checkpoint.pth")
    config = ckpt["model_config"]
    assert config["arch"] == "dinov2_vit_small"
    assert config["backbone_kwargs"] == {"patch_size": 4, "in_chans": 1, "img_size": 28, "drop_path_rate": 0.1,
                                         "depth": 2, "embed_dim": 24, "num_register_tokens": 2, "init_values": 1e-5}
    assert ckpt["args"]["ibot_weight"] == 1.0 and tuple(ckpt["args"]["mask_ratio"]) == (0.1, 0.5)
    assert ckpt["ibot_loss"]["center"].shape == (1, 48)
    backbone = build_backbone(config)
    state = {k[len("backbone."):]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
    backbone.load_state_dict(state)  # strict: registers, layer-scale gains and mask token included


@pytest.mark.slow
def test_dino_eval_knn_rebuilds_it_without_architecture_flags(straight):
    knn = ok(program("eval_knn", "--pretrained_weights", straight / "checkpoint.pth", "--subset", "60", "--nb_knn", "5",
                     "--num_workers", "0", "--device", "cpu"))
    assert "Loaded 'teacher' weights of dinov2_vit_small" in knn.stdout and "5-NN classifier result" in knn.stdout


@pytest.mark.slow
def test_dino_eval_linear_rebuilds_it_without_architecture_flags(straight, tmp_path):
    linear = ok(program("eval_linear", "--pretrained_weights", straight / "checkpoint.pth", "--subset", "60",
                        "--epochs", "1", "--n_last_blocks", "2", "--num_workers", "0", "--device", "cpu",
                        "--output_dir", tmp_path))
    assert "Loaded 'teacher' weights of dinov2_vit_small" in linear.stdout and "Top-1 test accuracy" in linear.stdout


@pytest.mark.slow
def test_dino_visualize_attention_rebuilds_it_without_architecture_flags(straight, tmp_path):
    import matplotlib.image

    ok(program("visualize_attention", "--pretrained_weights", straight / "checkpoint.pth", "--fashion_mnist_index",
               "0", "--output_dir", tmp_path, "--device", "cpu"))
    # 6 heads; the training size (28) at patch size 4: a 7 x 7 map of the patches (registers left out), upsampled.
    assert matplotlib.image.imread(tmp_path / "attn-head5.png").shape[:2] == (28, 28)
