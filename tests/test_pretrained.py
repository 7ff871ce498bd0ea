"""load_pretrained: every layout it reads gives the source model's features (1e-5), heads when they fit,
RGB weights adapted to N channels, position tables resampled, and a clear error when nothing fits.

The sources are independent of the loader: the official DINO layouts are written by hand and checked
against the float64 reference forward (tests/reference_vit.py) and a hand-written official head; the
DINOv2 ones come from the official model (tests/reference_dinov2_vit.py); torchvision and timm from
their own models.
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

from dino_pytorch import DINO, IBOTConfig, load_pretrained
from dino_pytorch.checkpoint import CheckpointError, official_state_dict, save_checkpoint
from dino_pytorch.head import DINOHead
from dino_pytorch.models import DinoVisionTransformer, as_masked_vit, vit_tiny
from dino_pytorch.optim import build_optimizer
from dino_pytorch.pretrained import WeightsDoNotFit
from reference_vit import reference_vit

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import reference_dinov2_vit as official_v2

HEAD = dict(out_dim=16, hidden_dim=12, bottleneck_dim=6)
TINY = dict(patch_size=4, depth=2, embed_dim=24, num_heads=2)


def tiny_vit(img_size=16, in_chans=3, **kwargs):
    return vit_tiny(img_size=img_size, in_chans=in_chans, **{**TINY, **kwargs})


def dino_of(backbone, size=16, channels=3, **kwargs):
    return DINO(backbone, **HEAD, input_size=(channels, size, size), **kwargs)


def random_state(module, seed):
    """``module``'s state dict with random values at a trained model's scale (gains near 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in module.state_dict().items():
        gain = key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "weight_g", "gamma"))
        out[key] = (1.0 if gain else 0.0) + (0.2 if gain else 0.1) * torch.randn(value.shape, generator=g)
    return out


def images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(ours, reference, rel=1e-5):
    reference = reference.to(ours.dtype)
    return (ours - reference).abs().max().item() <= rel * max(1.0, reference.abs().max().item())


def official_head(state, x):
    """The official DINOHead forward in float64: MLP (GELU), L2 normalise, weight-normed prototypes."""
    s = {k: v.double() for k, v in state.items()}
    x = x.double()
    for i in (0, 2, 4):
        x = x @ s[f"mlp.{i}.weight"].t() + s[f"mlp.{i}.bias"]
        x = F.gelu(x) if i < 4 else x
    x = x / x.norm(dim=-1, keepdim=True)
    v = s["last_layer.weight_v"]
    return x @ (s["last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)).t()


def backbone_equal(dino, state):
    return all(torch.equal(v, state[k]) for k, v in dino.backbone.state_dict().items())


# ------------------------------------------------------------------------------ official DINO layouts

def test_official_backbone_file_gives_the_reference_features(tmp_path):
    state = random_state(tiny_vit(), seed=1)  # the released layout: the backbone's keys, no prefix
    path = tmp_path / "dino_vittiny4_pretrain.pth"
    torch.save(state, path)
    dino = dino_of(tiny_vit())
    report = load_pretrained(dino, path)
    assert (report.layout, report.heads_loaded, report.unexpected) == ("state dict", False, ())
    assert report.loaded == len(state) and "holds no heads" in report.heads_note
    x = images(3, 3, 16, 16)
    reference = reference_vit({k: v.double() for k, v in state.items()}, x.double(), 4, 2)["cls"]
    with torch.no_grad():
        assert close(dino.backbone(x), reference) and close(dino.teacher_backbone(x), reference)
    assert str(path) in report.summary() and "fresh heads" in report.summary()


def official_full_checkpoint(tmp_path):
    """An official main_dino.py checkpoint: DDP's module. on the student, backbone./head. prefixes, the
    official head names, an argparse.Namespace and numpy scalars (what released full checkpoints hold)."""
    backbone, head = tiny_vit(), DINOHead(24, **HEAD)
    entries = {}
    for role, seed, prefix in (("student", 2, "module."), ("teacher", 3, "")):
        parts = {"backbone.": random_state(backbone, seed),
                 "head.": official_state_dict(random_state(head, seed + 10))}
        entries[role] = {prefix + part + k: v for part, state in parts.items() for k, v in state.items()}
    checkpoint = {**entries, "epoch": 3, "args": argparse.Namespace(arch="vit_tiny", out_dim=16),
                  "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(1e-4), "params": [0]}]},
                  "dino_loss": {"center": torch.randn(1, 16)}}
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    return path, checkpoint


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_official_full_checkpoint_loads_backbone_heads_and_centre(tmp_path, key):
    path, checkpoint = official_full_checkpoint(tmp_path)
    entry = {k.removeprefix("module."): v for k, v in checkpoint[key].items()}
    backbone = {k[len("backbone."):]: v.double() for k, v in entry.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v for k, v in entry.items() if k.startswith("head.")}
    dino = dino_of(tiny_vit())
    report = load_pretrained(dino, path, checkpoint_key=key)
    assert (report.layout, report.heads_loaded) == ("official DINO checkpoint", True)
    x = images(2, 3, 16, 16, seed=1)
    features = reference_vit(backbone, x.double(), 4, 2)["cls"]
    with torch.no_grad():
        for net in (dino.student, dino.teacher):  # the teacher is a copy of the student
            logits, feats = net([x], return_backbone_feats=True)
            assert close(feats, features) and close(logits, official_head(head, features))
    assert torch.equal(dino.criterion.center, checkpoint["dino_loss"]["center"])


# ------------------------------------------------------------------------------------ DINOv2 layouts

def official_dinov2(block_chunks, seed):
    torch.manual_seed(seed)
    model = official_v2.DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=48, depth=2, num_heads=4,
                                              init_values=1.0, block_chunks=block_chunks)
    model.load_state_dict(random_state(model, seed))
    return model.eval()


@pytest.mark.parametrize("layout", ["released", "training checkpoint", "eval teacher_checkpoint"])
def test_dinov2_layouts_give_the_official_features_at_the_model_size(tmp_path, layout):
    theirs = official_dinov2(block_chunks=0 if layout == "released" else 2, seed=4)
    state = theirs.state_dict()
    if layout == "training checkpoint":  # teacher and student side by side, heads beside, chunked blocks
        other = official_dinov2(block_chunks=2, seed=5).state_dict()
        model = {**{f"student.backbone.{k}": v for k, v in other.items()},
                 **{f"teacher.backbone.{k}": v for k, v in state.items()},
                 "teacher.dino_head.last_layer.weight_v": torch.randn(16, 6)}
        checkpoint = {"model": model, "iteration": 10}
    elif layout == "eval teacher_checkpoint":
        checkpoint = {"teacher": {**{f"backbone.{k}": v for k, v in state.items()},
                                  "dino_head.mlp.0.weight": torch.randn(12, 48)}}
    else:
        checkpoint = state
    path = tmp_path / "dinov2.pth"
    torch.save(checkpoint, path)
    # Ours at 28 px: a 2x2 grid where the file has 4x4, so the table is resampled on load.
    dino = dino_of(DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=4,
                                         init_values=1.0), size=28)
    report = load_pretrained(dino, path)
    assert report.layout == ("state dict" if layout == "released" else "DINOv2 checkpoint")
    assert report.adapted == ("pos_embed: 4x4 -> 2x2 position grid",) and not report.heads_loaded
    x = images(2, 3, 28, 28, seed=2)
    with torch.no_grad():
        assert close(dino.backbone(x), theirs(x)) and close(dino.teacher_backbone(x), theirs(x))


# --------------------------------------------------------------------------------- torchvision, timm

def test_torchvision_resnet18_state_dict(tmp_path):
    torch.manual_seed(6)
    source = torchvision.models.resnet18()
    with torch.no_grad():  # running statistics that matter, so a BN buffer left behind would show
        for m in source.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    source.eval()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    dino = dino_of(torchvision.models.resnet18(), size=32).eval()
    report = load_pretrained(dino, path)
    assert report.unexpected == ("fc.weight", "fc.bias") and report.layout == "state dict"
    x = images(2, 3, 32, 32, seed=3)
    with torch.no_grad():
        expected = torch.flatten(torch.nn.Sequential(*list(source.children())[:-1])(x), 1)
        assert close(dino.backbone(x), expected) and close(dino.teacher_backbone(x), expected)


def test_timm_vit_state_dict():
    kwargs = dict(pretrained=False, img_size=32, patch_size=8, depth=2)
    source = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    dino = dino_of(timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs), size=32)
    report = load_pretrained(dino, source.state_dict())
    assert report.target == "TimmFeatures.model (VisionTransformer)"
    assert report.unexpected == ("head.weight", "head.bias") and report.source == "the given state dict"
    x = images(2, 3, 32, 32, seed=4)
    with torch.no_grad():
        assert close(dino.eval().backbone(x), source.forward_head(source.forward_features(x), pre_logits=True))


# ------------------------------------------------------------------------------------ ours, with heads

def trained_dino(backbone, steps=2, **kwargs):
    dino = dino_of(backbone, **kwargs)
    optimizer = build_optimizer("adamw", dino.param_groups())
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    for step in range(steps):
        loss = dino([images(2, 3, 16, 16, seed=10 + step), images(2, 3, 16, 16, seed=20 + step)])
        optimizer.zero_grad()
        loss.backward()
        dino.optimizer_step(optimizer)
        dino.update_teacher(momentum=0.5)  # teacher and student clearly apart
    return dino, optimizer


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_our_checkpoint_loads_everything_from_one_role(tmp_path, key):
    source, optimizer = trained_dino(tiny_vit())
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, source.official_checkpoint(optimizer, 1, model_config={"arch": "vit_tiny"}))
    dino = dino_of(tiny_vit())
    report = load_pretrained(dino, path, checkpoint_key=key)
    assert (report.layout, report.heads_loaded, report.heads_note) == ("dino-pytorch checkpoint", True, "")
    role = source.teacher.module if key == "teacher" else source.student
    expected = role.state_dict()
    for net in (dino.student, dino.teacher.module):
        assert net.state_dict().keys() == expected.keys()
        assert all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())
    assert torch.equal(dino.criterion.center, source.criterion.center)


def test_heads_that_do_not_fit_stay_fresh_unless_required(tmp_path):
    source, optimizer = trained_dino(tiny_vit())
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, source.official_checkpoint(optimizer, 1))
    other = DINO(tiny_vit(), out_dim=32, hidden_dim=12, bottleneck_dim=6, input_size=(3, 16, 16))
    fresh = {k: v.clone() for k, v in other.student.head.state_dict().items()}
    report = load_pretrained(other, path)
    assert not report.heads_loaded and "head does not fit" in report.heads_note
    assert all(torch.equal(v, fresh[k]) for k, v in other.student.head.state_dict().items())
    assert backbone_equal(other, source.teacher_backbone.state_dict())
    with pytest.raises(WeightsDoNotFit, match="heads=True"):
        load_pretrained(dino_of(tiny_vit()), source.teacher_backbone.state_dict(), heads=True)
    same = dino_of(tiny_vit())
    fresh = {k: v.clone() for k, v in same.student.head.state_dict().items()}
    assert load_pretrained(same, path, heads=False).heads_note == "heads=False"
    assert all(torch.equal(v, fresh[k]) for k, v in same.student.head.state_dict().items())


def test_ibot_patch_head_and_masked_vit_adapter(tmp_path):
    ibot = IBOTConfig(out_dim=8)
    source, optimizer = trained_dino(as_masked_vit(tiny_vit()), ibot=ibot)
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, source.official_checkpoint(optimizer, 1))
    dino = dino_of(as_masked_vit(tiny_vit()), ibot=ibot)
    report = load_pretrained(dino, path)
    assert report.heads_loaded and report.target == "MaskedViT"
    expected = source.teacher.module.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in dino.student.state_dict().items())
    assert torch.equal(dino.ibot_loss.center, source.ibot_loss.center)
    plain = tiny_vit()  # a plain ViT's weights go into the adapter's ViT; its mask token stays
    mask_token = dino.backbone.mask_token.detach().clone()
    report = load_pretrained(dino, plain.state_dict())
    assert report.target == "MaskedViT.vit (VisionTransformer)" and not report.heads_loaded
    assert torch.equal(dino.backbone.mask_token, mask_token)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in dino.backbone.vit.state_dict().items())


def test_a_plain_backbone_target():
    source, target = tiny_vit(), tiny_vit()
    report = load_pretrained(target, {f"module.{k}": v for k, v in source.state_dict().items()})
    assert report.target == "VisionTransformer" and not report.heads_loaded and report.heads_note == ""
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())


# ------------------------------------------------------------------------------ channels and positions

@pytest.mark.parametrize("channels", [1, 6])
def test_rgb_weights_into_n_channels_by_the_adapt_input_channels_rule(channels):
    source = tiny_vit().eval()
    dino = dino_of(tiny_vit(in_chans=channels), channels=channels).eval()
    report = load_pretrained(dino, source.state_dict())
    assert report.adapted == (f"patch_embed.proj.weight: 3 -> {channels} input channels",)
    rgb = images(2, 3, 16, 16, seed=5)
    grey = images(2, 1, 16, 16, seed=6)
    with torch.no_grad():
        if channels == 1:  # exact on grey images: the RGB model on the grey image repeated
            assert close(dino.backbone(grey), source(grey.expand(-1, 3, -1, -1)))
        else:  # exact on bands repeating the RGB bands
            assert close(dino.backbone(torch.cat([rgb, rgb], 1)), source(rgb))


def test_position_table_of_another_grid_is_resampled_by_the_model():
    source = tiny_vit(img_size=32).eval()  # an 8x8 grid
    dino = dino_of(tiny_vit(img_size=16)).eval()  # 4x4
    report = load_pretrained(dino, source.state_dict())
    assert report.adapted == ("pos_embed: 8x8 -> 4x4 position grid",)
    x = images(2, 3, 16, 16, seed=7)
    reference = reference_vit({k: v.double() for k, v in source.state_dict().items()}, x.double(), 4, 2)["cls"]
    with torch.no_grad():
        assert close(dino.backbone(x), reference)
        assert close(dino.backbone(x), source(x))


# ------------------------------------------------------------------------------------------- errors

def test_weights_of_another_network_are_refused_and_nothing_is_loaded(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    dino = dino_of(tiny_vit())
    before = {k: v.clone() for k, v in dino.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(WeightsDoNotFit) as info:
        load_pretrained(dino, path)
    message = str(info.value)
    assert str(path) in message and "missing: cls_token, pos_embed" in message and "unexpected: conv1.weight" in message
    assert all(torch.equal(dino.state_dict()[k], v) for k, v in before.items())
    wider = tiny_vit(embed_dim=32)
    with pytest.raises(WeightsDoNotFit, match=r"shape mismatch: cls_token: file \(1, 1, 32\) vs model \(1, 1, 24\)"):
        load_pretrained(dino, wider.state_dict())
    v2 = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=4)
    with pytest.raises(WeightsDoNotFit, match="init_values=1.0"):  # DINOv2's own hints come along
        load_pretrained(v2, official_dinov2(0, seed=8).state_dict())


def test_files_that_hold_no_weights(tmp_path):
    path = tmp_path / "notes.pth"
    torch.save({"epoch": 3, "notes": {"a": 1}}, path)
    with pytest.raises(CheckpointError, match="no backbone weights found"):
        load_pretrained(tiny_vit(), path)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_pretrained(tiny_vit(), tmp_path / "empty.pth")
    with pytest.raises(TypeError, match="source is a int"):
        load_pretrained(tiny_vit(), 3)
    with pytest.raises(TypeError, match="target is a dict"):
        load_pretrained({}, path)
