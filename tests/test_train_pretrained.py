"""dino-train --pretrained_weights / --head_warmup_steps / --backbone_lr_scale: one-line errors, and a run
from RGB weights on grey images whose resume inside and after the warm-up is bit-identical."""
from __future__ import annotations

import shutil

import pytest
import torch

from dino_pytorch.models import vit_tiny
from train_cases import ROOT, load, run
from train_cases import in_process_usage_error as one_line_error

ERRORS_BASE = ["--dataset", "fashion_mnist", "--arch", "convnet", "--width", "4", "--out_dim", "16",
               "--hidden_dim", "16", "--bottleneck_dim", "8", "--batch_size_per_gpu", "8", "--local_crops_number",
               "0", "--max_steps", "1", "--num_workers", "0", "--no_final_knn", "--no_progress",
               "--attention_maps", "0", "--device", "cpu"]




def test_flag_errors_are_one_line(tmp_path, capsys):
    base = [*ERRORS_BASE, "--output_dir", str(tmp_path / "run")]
    err = one_line_error([*base, "--pretrained_weights", str(tmp_path / "no_such.pth")], capsys)
    assert f"--pretrained_weights '{tmp_path / 'no_such.pth'}': no such file" in err
    err = one_line_error([*base, "--head_warmup_steps", "-1"], capsys)
    assert "--head_warmup_steps -1: expected an int >= 0" in err
    assert "--backbone_lr_scale -0.1: expected a finite number >= 0" in one_line_error(
        [*base, "--backbone_lr_scale", "-0.1"], capsys)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    err = one_line_error([*base, "--pretrained_weights", str(garbage)], capsys)
    assert f"--pretrained_weights {garbage}: checkpoint" in err and "corrupt" in err
    vit = tmp_path / "vit.pth"  # a ViT's weights for --arch convnet: the architecture's flags are named
    torch.save(vit_tiny(patch_size=7, depth=1, embed_dim=48, img_size=28).state_dict(), vit)
    err = one_line_error([*base, "--pretrained_weights", str(vit)], capsys)
    assert f"--pretrained_weights {vit}: {vit} does not fit the backbone (ConvNet)" in err
    assert "missing: " in err and "unexpected: cls_token" in err and "Pass the flags of the file's architecture" in err


VIT = ["--dataset", "fashion_mnist", "--arch", "vit_tiny", "--patch_size", "7", "--vit_depth", "2",
       "--vit_embed_dim", "48", "--out_dim", "128", "--hidden_dim", "32", "--bottleneck_dim", "16",
       "--batch_size_per_gpu", "16", "--local_crops_number", "2", "--num_workers", "0", "--no_final_knn",
       "--no_progress", "--log_every", "2", "--warmup_epochs", "0", "--save_every_min", "0", "--drop_path_rate",
       "0", "--attention_maps", "0", "--lr", "0.01", "--max_steps", "6", "--head_warmup_steps", "3",
       "--backbone_lr_scale", "0.5", "--freeze_last_layer", "1", "--save_every_steps", "2"]
FAULTS = (str(ROOT / "tests" / "crash_after_save.py"),)


def prefixed(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def same_entries(a, b, prefix=""):
    return all(torch.equal(v, b[k]) for k, v in a.items() if k.startswith(prefix))


@pytest.mark.slow
def test_run_from_rgb_weights_resumed_inside_and_after_the_warm_up_is_bit_identical(tmp_path):
    rgb = vit_tiny(patch_size=7, depth=2, embed_dim=48, img_size=28).state_dict()
    weights = tmp_path / "vit_rgb.pth"
    torch.save(rgb, weights)
    flags = [*VIT, "--pretrained_weights", str(weights)]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = run([*flags, "--output_dir", str(straight)], module=FAULTS,
              env={"INITIAL_CHECKPOINT": str(tmp_path / "initial.pth")})
    assert "adapted patch_embed.proj.weight: 3 -> 1 input channels" in out.stdout
    saved = {}
    for stop in (2, 4):  # killed inside the warm-up, then right after it
        killed = run([*flags, "--output_dir", str(resumed)], module=FAULTS, env={"CRASH_AFTER_STEP": str(stop)},
                     check=False)
        assert killed.returncode == 17, killed.stderr[-2000:]
        shutil.copy(resumed / "checkpoint.pth", tmp_path / f"step{stop}.pth")
        saved[stop] = load(tmp_path / f"step{stop}.pth")
    out = run([*flags, "--output_dir", str(resumed)])
    assert "not loaded, the run resumes from" in out.stdout
    a, b = load(straight / "checkpoint.pth"), load(resumed / "checkpoint.pth")
    assert a["step"] == b["step"] == 6
    for key in ("student", "teacher", "dino_loss"):
        assert a[key].keys() == b[key].keys() and same_entries(a[key], b[key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][e], sb[i][e]) for i in sa for e in sa[i])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]

    # The start: the RGB weights with the input filters summed (grey images), student = teacher.
    initial = load(tmp_path / "initial.pth")
    expected = {**rgb, "patch_embed.proj.weight": rgb["patch_embed.proj.weight"].sum(1, keepdim=True)}
    for role in ("student", "teacher"):
        assert same_entries(prefixed(initial[role], "backbone."), expected)
    # Inside the warm-up: backbones untouched, heads (prototypes too, --freeze_last_layer 1) learning.
    for role in ("student", "teacher"):
        assert same_entries(prefixed(saved[2][role], "backbone."), expected)
    heads0, heads2 = prefixed(initial["student"], "head."), prefixed(saved[2]["student"], "head.")
    assert not any(torch.equal(v, heads2[k]) for k, v in heads0.items() if k.endswith(("weight", "weight_v")))
    # After it: the backbone trains, the prototypes are held from step 3 on (the freeze's first epoch).
    qkv = "blocks.0.attn.qkv.weight"
    assert not torch.equal(saved[4]["student"][f"backbone.{qkv}"], expected[qkv])
    assert torch.equal(saved[4]["student"]["head.last_layer.weight_v"], b["student"]["head.last_layer.weight_v"])
    assert not torch.equal(saved[4]["student"]["head.mlp.0.weight"], b["student"]["head.mlp.0.weight"])
    scaled = [g for g in b["optimizer"]["param_groups"] if "lr_scale" in g]
    assert len(scaled) == 2 and all(g["lr"] == 0.5 * b["optimizer"]["param_groups"][0]["lr"] for g in scaled)
