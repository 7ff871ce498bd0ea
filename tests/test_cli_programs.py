"""The user's path across the programs: train, then evaluate and look at the same checkpoint with no
architecture flags; optional extras missing; files that cannot describe their network."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "fashion_mnist", "--out_dim", "128", "--hidden_dim", "32", "--bottleneck_dim", "16",
        "--batch_size_per_gpu", "8", "--local_crops_number", "2", "--num_workers", "0", "--no_progress",
        "--max_steps", "3", "--log_every", "1", "--warmup_epochs", "0", "--freeze_last_layer", "0"]
# A ViT of non-default depth and width: nothing but the checkpoint says so.
VIT = ["--arch", "vit_tiny", "--patch_size", "7", "--vit_depth", "2", "--vit_embed_dim", "48"]


def program(module, *args, env=None):
    return subprocess.run([sys.executable, "-m", f"dino_pytorch.cli.{module}", *map(str, args)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=300)


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def one_line_error(result, *words):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit")
    ok(program("train", *TINY, *VIT, "--no_final_knn", "--attention_maps", "0", "--output_dir", out))
    return out / "checkpoint.pth"


@pytest.fixture(scope="module")
def convnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("convnet")
    ok(program("train", *TINY, "--arch", "convnet", "--width", "8", "--no_final_knn", "--output_dir", out))
    return out / "checkpoint.pth"


@pytest.mark.slow
def test_checkpoint_describes_its_network(vit_run):
    config = torch.load(vit_run, weights_only=True)["model_config"]
    assert config["schema_version"] == 1 and config["arch"] == "vit_tiny"
    assert {k: config["backbone_kwargs"][k] for k in ("patch_size", "depth", "embed_dim", "in_chans", "img_size")} == \
        {"patch_size": 7, "depth": 2, "embed_dim": 48, "in_chans": 1, "img_size": 28}
    assert config["head"]["in_dim"] == 48 and config["head"]["out_dim"] == 128
    assert config["data"]["dataset"] == "fashion_mnist"


@pytest.mark.slow
def test_knn_on_a_vit_checkpoint_needs_no_architecture_flags(vit_run):
    result = ok(program("eval_knn", "--pretrained_weights", vit_run, "--subset", "100", "--nb_knn", "5",
                        "--num_workers", "0", "--device", "cpu"))
    assert "Loaded 'teacher' weights of vit_tiny" in result.stdout and "5-NN classifier result" in result.stdout


@pytest.mark.slow
def test_knn_on_a_convnet_checkpoint_needs_no_architecture_flags(convnet_run, tmp_path):
    ok(program("eval_knn", "--pretrained_weights", convnet_run, "--subset", "50", "--nb_knn", "3",
               "--num_workers", "0", "--device", "cpu", "--dump_features", tmp_path))
    train_features = torch.load(tmp_path / "trainfeat.pth", weights_only=True)
    assert train_features.shape == (50, 8 * 4)  # width 8, three stages: 8 * 2**2 channels


@pytest.mark.slow
def test_attention_maps_of_a_vit_checkpoint_need_no_architecture_flags(vit_run, tmp_path):
    import matplotlib.image

    png = tmp_path / "x.png"
    matplotlib.image.imsave(png, torch.rand(30, 40, 3).numpy())
    ok(program("visualize_attention", "--pretrained_weights", vit_run, "--image_path", png,
               "--output_dir", tmp_path / "maps", "--device", "cpu"))
    names = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert "attn-head0.png" in names and "img.png" in names
    # The training image size (28) and patch size (7) give a 4 x 4 map, upsampled to 28 x 28.
    assert matplotlib.image.imread(tmp_path / "maps" / "attn-head0.png").shape[:2] == (28, 28)


@pytest.mark.slow
def test_attention_maps_of_a_convnet_say_they_need_a_vit(convnet_run, tmp_path):
    result = program("visualize_attention", "--pretrained_weights", convnet_run, "--fashion_mnist_index", "0",
                     "--output_dir", tmp_path)
    one_line_error(result, "convnet", "need a ViT")


@pytest.mark.slow
def test_a_file_without_configuration_names_the_flags_to_pass(vit_run, tmp_path):
    ckpt = torch.load(vit_run, weights_only=True)
    del ckpt["model_config"]  # as written before 0.2, or an official file
    legacy = tmp_path / "legacy.pth"
    torch.save(ckpt, legacy)
    result = program("eval_knn", "--pretrained_weights", legacy, "--dataset", "fashion_mnist", "--subset", "20",
                     "--nb_knn", "3", "--num_workers", "0", "--device", "cpu")
    one_line_error(result, "stores no model configuration", "--arch", "--patch_size", "--vit_depth")
    # ... and the flags it names are enough.
    ok(program("eval_knn", "--pretrained_weights", legacy, "--dataset", "fashion_mnist", "--subset", "20",
                "--nb_knn", "3", "--num_workers", "0", "--device", "cpu", *VIT))
    # Attention maps of such a file: patch size, channels, image size, depth and width come from the
    # weights; only the family (its head count) is the user's to say.
    ok(program("visualize_attention", "--pretrained_weights", legacy, "--arch", "vit_tiny",
               "--fashion_mnist_index", "1", "--output_dir", tmp_path / "maps"))
    assert (tmp_path / "maps" / "attn-head2.png").exists()


@pytest.mark.slow
def test_a_newer_schema_is_refused_in_one_line(vit_run, tmp_path):
    ckpt = torch.load(vit_run, weights_only=True)
    ckpt["model_config"]["schema_version"] = 99
    newer = tmp_path / "newer.pth"
    torch.save(ckpt, newer)
    one_line_error(program("eval_knn", "--pretrained_weights", newer, "--num_workers", "0"),
                   "schema_version=99", "newer dino-pytorch")


@pytest.mark.slow
def test_training_ends_well_without_the_optional_extras(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("matplotlib", "tqdm"):  # as after a plain `pip install dino-pytorch`
        (blocked / f"{name}.py").write_text(f"raise ImportError('blocked by the test: {name}')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "run"
    args = [a for a in TINY if a != "--no_progress"]  # the progress bar is wanted, and missing
    result = ok(program("train", *args, *VIT, "--no_final_knn", "--attention_maps", "2", "--output_dir", out, env=env))
    skipped = [line for line in result.stdout.splitlines() if "skipped" in line]
    assert any("progress bar" in line and "tqdm" in line for line in skipped), result.stdout
    assert any("curves.png" in line and "matplotlib" in line for line in skipped), result.stdout
    assert (out / "checkpoint.pth").exists() and not (out / "curves.png").exists()
