import argparse
import copy
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dino_pytorch import DINOHead, DINOLoss, EMATeacher, MultiCropWrapper
from dino_pytorch.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_into,
    load_official_weights,
    make_official_checkpoint,
    official_state_dict,
    read_checkpoint,
    save_checkpoint,
    strip_prefixes,
)
from dino_pytorch.models import vit_tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_vit(depth=2):
    return vit_tiny(patch_size=8, img_size=16, in_chans=1, embed_dim=24, depth=depth)


def tiny_head():
    return DINOHead(24, 32, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)


def perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def student_and_teacher(seed=0):
    torch.manual_seed(seed)
    student = MultiCropWrapper(tiny_vit(), tiny_head())
    teacher = EMATeacher(student)
    perturb(teacher.module, seed + 1)  # teacher != student, so a swapped key would show
    return student, teacher


def outputs(wrapper, x):
    wrapper.eval()
    with torch.no_grad():
        return wrapper(x)


X = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(9))


# ------------------------------------------------------------------------------ atomic saving

def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"w": torch.arange(5.0), "epoch": 3, "args": {"lr": 0.1}})
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["w"], torch.arange(5.0)) and loaded["epoch"] == 3
    assert os.listdir(tmp_path) == ["ckpt.pth"]  # no temporary file left behind


def test_crash_before_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"version": torch.tensor(1)})
    old_bytes = path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, {"version": torch.tensor(2)})
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert load_checkpoint(path)["version"].item() == 1
    assert os.listdir(tmp_path) == ["ckpt.pth"]


# The child writes through a proxy that, once 64 KiB of the new checkpoint are on disk, reports
# and blocks; the parent then SIGKILLs it. Deterministic: the kill happens mid-write, every time.
_CHILD = textwrap.dedent(
    """
    import os, sys, time, torch
    from dino_pytorch.checkpoint import save_checkpoint
    real_save = torch.save

    class Stalling:
        def __init__(self, f):
            self.f, self.written = f, 0
        def write(self, b):
            n = self.f.write(b)
            self.written += len(b)
            if self.written >= 65536:
                self.f.flush()
                os.fsync(self.f.fileno())
                print("MIDWRITE", flush=True)
                time.sleep(60)
            return n
        def flush(self):
            self.f.flush()

    torch.save = lambda obj, f: real_save(obj, Stalling(f))
    save_checkpoint(sys.argv[1], {"version": torch.full((100000,), 2.0)})
    """
)


@pytest.mark.skipif(not hasattr(os, "kill") or sys.platform == "win32", reason="needs POSIX signals")
def test_process_killed_mid_write_keeps_old_file(tmp_path):
    import signal

    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"version": torch.full((10,), 1.0)})
    old_bytes = path.read_bytes()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert child.stdout.readline().strip() == "MIDWRITE"
        partial = [p for p in tmp_path.iterdir() if p.name != "ckpt.pth"]
        assert len(partial) == 1 and partial[0].stat().st_size >= 65536  # the new file, half written
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
    assert path.read_bytes() == old_bytes
    assert torch.equal(load_checkpoint(path)["version"], torch.full((10,), 1.0))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(partial[0])  # what a non-atomic writer would have left at `path`
    save_checkpoint(path, {"version": torch.full((10,), 3.0)})  # and the next save works
    assert load_checkpoint(path)["version"][0].item() == 3.0


def test_save_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="state is a list"):
        save_checkpoint(tmp_path / "a.pth", [1, 2])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "missing" / "a.pth", {})


# ------------------------------------------------------------------------------ safe loading

def test_missing_empty_truncated_and_corrupt_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(1000)}, good)
    data = good.read_bytes()
    cases = {
        "missing.pth": (None, "does not exist"),
        "empty.pth": (b"", "empty"),
        "truncated.pth": (data[: len(data) // 2], "truncated or corrupt"),
        "garbage.pth": (b"not a checkpoint at all" * 10, "truncated or corrupt"),
        "flipped.pth": (data[:60] + b"x" * 200 + data[260:], "truncated or corrupt"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)
        if content:
            assert info.value.__cause__ is not None  # the original error stays chained
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


def test_safe_loading_refuses_pickled_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(1), "payload": Evil()}, path)
    for load in (load_checkpoint, load_official_weights):
        with pytest.raises(CheckpointError, match="global getattr, which safe loading refuses: unpickling it can "
                                                  "run code") as info:
            load(path)
        message = str(info.value).replace(str(tmp_path), "")
        assert "trusted" not in message and "weights_only=False" not in message
    assert not marker.exists()


class _MyConfig:
    """An object of the user's own, pickled into a file the user made."""

    def __init__(self, value):
        self.value = value


def test_trusted_is_for_files_you_made(tmp_path):
    path = tmp_path / "mine.pth"
    torch.save({"w": torch.ones(1), "config": _MyConfig(3)}, path)
    with pytest.raises(CheckpointError, match="_MyConfig") as info:
        read_checkpoint(path)
    assert "trusted" not in str(info.value).replace(str(tmp_path), "")
    with pytest.warns(UserWarning, match="weights_only=False"):
        assert read_checkpoint(path, trusted=True)["config"].value == 3


def test_non_dict_checkpoint(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.ones(2), path)
    with pytest.raises(CheckpointError, match="holds a Tensor, expected a dict"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------ official layout

def test_official_state_dict_renames_only_the_weight_norm_keys():
    head = tiny_head()
    state = {"backbone.x": torch.ones(1), **{f"head.{k}": v for k, v in head.state_dict().items()}}
    mapped = official_state_dict(state)
    assert "head.last_layer.weight_g" in mapped and "head.last_layer.weight_v" in mapped
    assert not any("parametrizations" in k for k in mapped) and "backbone.x" in mapped
    assert mapped["head.last_layer.weight_v"] is state["head.last_layer.parametrizations.weight.original1"]
    fresh = tiny_head()
    fresh.load_state_dict({k[5:]: v for k, v in mapped.items() if k.startswith("head.")})
    assert torch.equal(fresh.last_layer.weight, head.last_layer.weight)


def test_make_official_checkpoint_layout(tmp_path):
    student, teacher = student_and_teacher()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student(X).sum().backward()
    optimizer.step()
    loss = DINOLoss(32)
    args = argparse.Namespace(arch="vit_tiny", lr=5e-4, output_dir=pathlib.Path("/tmp/run"), crops=(0.4, 1.0))
    ckpt = make_official_checkpoint(student, teacher, optimizer, 5, loss, fp16_scaler={"scale": 1024.0},
                                    args=args, step=123)
    assert set(ckpt) == {"student", "teacher", "optimizer", "epoch", "dino_loss", "fp16_scaler", "args", "step"}
    assert ckpt["epoch"] == 5 and ckpt["step"] == 123 and ckpt["fp16_scaler"] == {"scale": 1024.0}
    for part in ("student", "teacher"):
        assert all(k.startswith(("backbone.", "head.")) for k in ckpt[part])
        assert not any("parametrizations" in k for k in ckpt[part])
        assert "head.last_layer.weight_g" in ckpt[part] and "head.last_layer.weight_v" in ckpt[part]
    # DDP-wrapped or state-dict inputs give the same keys.
    # (a copy: DataParallel moves its module to the GPU when there is one)
    wrapped = torch.nn.DataParallel(copy.deepcopy(student))
    official = make_official_checkpoint(wrapped, teacher.module.state_dict(), {}, 0, loss)
    assert list(official["student"]) == list(ckpt["student"])
    assert list(ckpt["dino_loss"]) == ["center"]
    assert ckpt["args"] == {"arch": "vit_tiny", "lr": 5e-4, "output_dir": "/tmp/run", "crops": (0.4, 1.0)}
    assert "fp16_scaler" not in make_official_checkpoint(student, teacher, optimizer, 0, loss)
    # Loads with weights_only=True (no pickled objects inside), and straight back into the modules.
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, ckpt)
    loaded = load_checkpoint(path)
    assert loaded["args"]["arch"] == "vit_tiny" and isinstance(loaded["args"], dict)
    new_student, new_teacher = student_and_teacher(seed=7)
    new_student.load_state_dict(loaded["student"])
    new_teacher.module.load_state_dict(loaded["teacher"])
    assert torch.equal(outputs(new_teacher.module, X), outputs(teacher.module, X))
    assert torch.equal(outputs(new_student, X), outputs(student, X))
    fresh = torch.optim.AdamW(new_student.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    with pytest.raises(ValueError, match="epoch=-1"):
        make_official_checkpoint(student, teacher, optimizer, -1, loss)
    with pytest.raises(TypeError, match="args is a list"):
        make_official_checkpoint(student, teacher, optimizer, 0, loss, args=[1])


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_round_trip_into_vit_and_head(tmp_path, key):
    student, teacher = student_and_teacher()
    loss = DINOLoss(32)
    path = tmp_path / "checkpoint.pth"
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    save_checkpoint(path, make_official_checkpoint(student, teacher, optimizer, 1, loss))
    source = teacher.module if key == "teacher" else student
    torch.manual_seed(123)
    backbone, head = tiny_vit(), tiny_head()
    load_into(backbone, head, path, checkpoint_key=key)
    assert torch.equal(outputs(MultiCropWrapper(backbone, head), X), outputs(source, X))


def _official_full_checkpoint(path, student, teacher):
    """What official main_dino.py writes: DDP student keys, weight_g/v, a pickled Namespace, numpy
    float64 lr / weight decay in the optimizer's param groups."""
    student_state = {f"module.{k}": v for k, v in official_state_dict(student.state_dict()).items()}
    teacher_state = official_state_dict(teacher.module.state_dict())
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = np.linspace(0.0, 0.1, 5)[3], np.float64(0.04)
    torch.save({
        "student": student_state,
        "teacher": teacher_state,
        "optimizer": optimizer.state_dict(),
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=32, global_crops_scale=(0.4, 1.0),
                                   local_crops_scale=[0.05, 0.4], output_dir="/out", use_fp16=True),
        "dino_loss": {"center": torch.zeros(1, 32)},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                        "_growth_tracker": 0},
    }, path)


def test_official_full_checkpoint_loads_without_trust(tmp_path, recwarn):
    student, teacher = student_and_teacher()
    path = tmp_path / "official.pth"
    _official_full_checkpoint(path, student, teacher)
    raw = read_checkpoint(path)
    assert isinstance(raw["args"], argparse.Namespace) and raw["args"].patch_size == 8
    assert isinstance(raw["optimizer"]["param_groups"][0]["lr"], np.float64)
    assert load_checkpoint(path)["epoch"] == 100
    backbone_state, head_state = load_official_weights(path)
    assert "pos_embed" in backbone_state and "blocks.1.attn.qkv.weight" in backbone_state
    assert "last_layer.weight_g" in head_state and "mlp.0.weight" in head_state
    backbone, head = tiny_vit(), tiny_head()
    load_into(backbone, head, path)
    assert torch.equal(outputs(MultiCropWrapper(backbone, head), X), outputs(teacher.module, X))
    load_into(backbone, head, path, checkpoint_key="student")
    assert torch.equal(outputs(MultiCropWrapper(backbone, head), X), outputs(student, X))
    assert not [w for w in recwarn if "weights_only" in str(w.message)]


def test_allowlist_is_scoped_to_the_load(tmp_path):
    path = tmp_path / "ns.pth"
    torch.save({"args": argparse.Namespace(a=1)}, path)
    assert read_checkpoint(path)["args"].a == 1
    with pytest.raises(Exception, match="argparse.Namespace"):  # no process-global allowlisting
        torch.load(path, weights_only=True)


def test_backbone_only_file(tmp_path):
    torch.manual_seed(0)
    source = perturb(tiny_vit(), 5)
    path = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save(source.state_dict(), path)  # as released on the model zoo
    backbone_state, head_state = load_official_weights(path)
    assert head_state == {} and set(backbone_state) == set(source.state_dict())
    backbone = tiny_vit()
    load_into(backbone, None, path)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(X), source.eval()(X))
    with pytest.raises(CheckpointError, match="backbone only"):
        load_into(backbone, tiny_head(), path)


def test_load_into_reports_mismatches_and_loads_nothing(tmp_path):
    student, teacher = student_and_teacher()
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, make_official_checkpoint(student, teacher, {}, 0, DINOLoss(32)))
    deeper = tiny_vit(depth=3)
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"missing: \['blocks\.2\.") as info:
        load_into(deeper, None, path)
    assert str(path) in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in deeper.state_dict().items())
    wider = vit_tiny(patch_size=8, img_size=32, in_chans=1, embed_dim=24, depth=2)
    match = r"shape mismatch: \['pos_embed: file \(1, 5, 24\) vs model \(1, 17, 24\)"
    with pytest.raises(CheckpointError, match=match):
        load_into(wider, None, path)
    with pytest.raises(CheckpointError, match="checkpoint_key='ema'.*'student', 'teacher'"):
        load_official_weights(path, checkpoint_key="ema")


def test_strip_prefixes_only_strips_prefixes():
    state = {"module.backbone.blocks.0.w": 1, "backbone.norm.w": 2, "blocks.1.backbone.w": 3, "head.x": 4}
    assert strip_prefixes(state) == {"blocks.0.w": 1, "norm.w": 2, "blocks.1.backbone.w": 3, "head.x": 4}
    with pytest.raises(CheckpointError, match="two keys"):
        strip_prefixes({"module.a": 1, "a": 2})
