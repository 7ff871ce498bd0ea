"""dino-train and the evaluation programs on own data: flag checks in one line, a run over a folder
with corrupt files (counted, reported, resumed bit-identically), --mean auto in the checkpoint and
dino-eval-knn reading it, and unlabelled data refused by the evaluations."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dino_pytorch.cli.eval_knn import evaluate as eval_knn
from dino_pytorch.cli.train import main as train_main
from dino_pytorch.data import ImageFiles, sample_indices
from dino_pytorch.model_config import build_backbone
from own_data_cases import labelled_photos, write_bands, write_corrupt, write_photo
from test_train import assert_same_state
from test_train_features import naive_knn_top1
from train_cases import ROOT, load, run

TINY = ["--arch", "convnet", "--width", "8", "--out_dim", "64", "--hidden_dim", "32", "--bottleneck_dim", "16",
        "--batch_size_per_gpu", "4", "--local_crops_number", "2", "--global_crop_size", "16", "--local_crop_size", "8",
        "--no_progress", "--log_every", "2", "--warmup_epochs", "0", "--freeze_last_layer", "0",
        "--save_every_min", "0", "--saveckp_freq", "0", "--lr", "0.01"]


def one_line_error(capsys, argv, program=train_main):
    with pytest.raises(SystemExit) as exit_info:
        program(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    for i in range(4):
        write_photo(root / "photos" / f"{i}.png", rng)
    write_bands(root / "bands" / "a.npy", rng.integers(0, 255, (13, 20, 20), dtype=np.uint8))
    return root


def test_flags_against_the_data_fail_in_one_line(folders, tmp_path, capsys):
    photos, bands = str(folders / "photos"), str(folders / "bands")
    common = [*TINY, "--output_dir", str(tmp_path / "out"), "--num_workers", "0"]
    cases = [
        (["--data_path", photos, "--in_chans", "4"],
         f"--in_chans 4: the data ({photos}) have 3 channels; expected 1 or 3"),
        (["--data_path", bands, "--in_chans", "3"], f"--in_chans 3: the data ({bands}) have 13 channels; expected 13"),
        (["--data_path", photos, "--mean", "0.5", "0.5"], "--mean 0.5 0.5: 2 numbers for 3-channel images"),
        (["--data_path", photos, "--std", "auto", "x"], "--std auto x: expected auto or 3 numbers"),
        (["--data_path", photos, "--value_range", "0", "1"], "--value_range 0.0 1.0: only band files"),
        (["--data_path", bands, "--value_range", "5", "1"], "--value_range 5.0 1.0: value_range="),
        (["--file_list", str(tmp_path / "none.txt")], "--file_list"),
        (["--dataset", "fashion_mnist", "--file_list", photos], "with --dataset fashion_mnist: expected one"),
        (["--data_path", str(tmp_path)], "no image files under it"),
        (["--data_path", bands, "--arch", "resnet18"], "--arch resnet18: a torchvision model takes 3 channels, and the "
                                                       f"data ({bands}) have 13"),
    ]
    for extra, expected in cases:
        err = one_line_error(capsys, [*common, *extra])
        assert err.startswith("dino-train: error: ") and expected in err, (extra, err)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_eval_programs_refuse_unlabelled_data_and_half_given_flags(folders, capsys):
    photos = str(folders / "photos")
    base = ["--arch", "convnet", "--width", "8", "--num_workers", "0", "--nb_knn", "2"]
    err = one_line_error(capsys, [*base, "--train_data", photos, "--val_data", photos], eval_knn)
    assert f"--train_data '{photos}' has no labels, and this evaluation needs labelled data" in err
    err = one_line_error(capsys, [*base, "--train_data", photos], eval_knn)
    assert f"--train_data '{photos}' without --val_data: expected both" in err


@pytest.fixture(scope="module")
def corrupt_run(tmp_path_factory):
    """A flat, unlabelled folder of 20 photos, 2 corrupt files and one too small for the crops:
    6 steps straight, and 3 steps killed after its checkpoint then resumed; --mean auto, 2 workers."""
    tmp = tmp_path_factory.mktemp("corrupt")
    data = tmp / "data"
    rng = np.random.default_rng(1)
    for i in range(20):
        write_photo(data / f"{i:02d}.png", rng, size=(24, 24), level=60.0 + 6 * i)
    write_corrupt(data / "05x.jpg")
    write_corrupt(data / "11x.png", kind="truncated")
    write_photo(data / "17x.png", rng, size=(3, 3))
    args = [*TINY, "--data_path", str(data), "--max_steps", "6", "--num_workers", "2", "--mean", "auto",
            "--std", "auto", "--save_every_steps", "3"]
    straight = run([*args, "--output_dir", str(tmp / "straight")])
    killed = run([*args, "--output_dir", str(tmp / "resumed")], env={"CRASH_AFTER_STEP": "3"},
                 module=(str(ROOT / "tests" / "crash_after_save.py"),), check=False)
    assert killed.returncode == 17
    resumed = run([*args, "--output_dir", str(tmp / "resumed")])
    return data, tmp, straight, resumed


@pytest.mark.slow
def test_corrupt_files_are_reported_and_the_run_completes(corrupt_run):
    data, tmp, straight, resumed = corrupt_run
    lines = straight.stdout.splitlines()
    assert any(line.startswith("k-NN evaluations skipped: ") and "has no labels" in line for line in lines)
    progress = [line for line in lines if "replaced by other samples so far" in line]
    final = [line for line in lines if "replaced by other samples in this run" in line]
    assert progress and len(final) == 1
    # 6 steps x 4 images cover 24 of the 23 files' sample slots: each bad file's own index is read once,
    # plus any time it is drawn as a stand-in.
    assert "3 undecodable files" in final[0], final[0]
    for name, reason in (("05x.jpg", "UnidentifiedImageError"), ("11x.png", "truncated"), ("17x.png", "9 pixels")):
        assert f"{name} (" in final[0] and reason in final[0].split(f"{name} (")[1].split(")")[0], final[0]
    assert "stopped at step 6/6: finished" in straight.stdout
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout


@pytest.mark.slow
def test_resume_over_corrupt_files_is_bit_identical(corrupt_run):
    _, tmp, _, _ = corrupt_run
    a, b = load(tmp / "straight" / "checkpoint.pth"), load(tmp / "resumed" / "checkpoint.pth")
    assert a["step"] == b["step"] == 6
    assert_same_state(a, b)


@pytest.mark.slow
def test_mean_auto_equals_naive_float64_and_lands_in_the_checkpoint(corrupt_run):
    data, tmp, straight, _ = corrupt_run
    stored = load(tmp / "straight" / "checkpoint.pth")["model_config"]["data"]
    files = ImageFiles.from_folder(data)
    good = [i for i in sample_indices(len(files), seed=0) if "x." not in files.names[i]]
    pixels = np.concatenate([np.asarray(Image.open(data / files.names[i]).convert("RGB"), np.float64).reshape(-1, 3)
                             for i in good]) / 255.0
    np.testing.assert_allclose(stored["mean"], pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stored["std"], pixels.std(axis=0), rtol=1e-12)
    assert stored["statistics"] == "auto (20 images, seed 0)" and stored["value_range"] is None
    assert stored["in_chans"] == 3
    assert "data statistics of" in straight.stdout and "3 undecodable files skipped" in straight.stdout


@pytest.mark.slow
def test_eval_knn_reads_own_data_with_the_checkpoints_statistics(corrupt_run, tmp_path):
    _, tmp, _, _ = corrupt_run
    ckpt_path = tmp / "straight" / "checkpoint.pth"
    bank, queries = labelled_photos(tmp_path / "bank", per_class=6, seed=2), tmp_path / "queries"
    labelled_photos(queries, per_class=2, seed=3)
    listed = sorted(queries.rglob("*.png"))
    (tmp_path / "queries.txt").write_text("".join(f"queries/{p.relative_to(queries).as_posix()}\t"
                                                  f"{p.relative_to(queries).parts[0]}\n" for p in listed))
    results = eval_knn(["--pretrained_weights", str(ckpt_path), "--train_data", str(bank), "--val_data",
                        str(tmp_path / "queries.txt"), "--nb_knn", "5", "--num_workers", "0"])
    # The naive path: the stored statistics, the official resize / crop scaled to the stored size, one image at a time.
    ckpt = load(ckpt_path)
    config = ckpt["model_config"]
    model = build_backbone(config).eval()
    model.load_state_dict({k[len("backbone."):]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")})
    size = config["data"]["image_size"]
    tf = T.Compose([T.Resize(round(size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                    T.ToTensor(), T.Normalize(config["data"]["mean"], config["data"]["std"])])

    def features(paths):
        with torch.no_grad():
            return model(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths]))

    bank_paths = sorted(bank.rglob("*.png"), key=lambda p: p.relative_to(bank).as_posix())
    query_paths = sorted(queries.rglob("*.png"), key=lambda p: p.relative_to(queries).as_posix())
    label = lambda p, root: ["cat", "dog"].index(p.relative_to(root).parts[0])  # noqa: E731
    expected = naive_knn_top1(features(bank_paths), torch.tensor([label(p, bank) for p in bank_paths]),
                              features(query_paths), torch.tensor([label(p, queries) for p in query_paths]), k=5)
    assert results[5][0] == pytest.approx(expected, abs=1e-9)
    assert config["data"]["mean"] != [0.485, 0.456, 0.406]  # the measured statistics, not ImageNet's


def test_file_list_run_with_labels_evaluates_and_draws_attention_maps(tmp_path, capsys):
    # In-process, 2 steps of a 1-block ViT: a labelled file list (one class per line) gives the
    # in-training k-NN (a split of the list: every 10th file queries the rest) and the attention maps.
    labelled_photos(tmp_path / "imgs", per_class=12, size=(16, 16))
    listed = sorted((tmp_path / "imgs").rglob("*.png"))
    (tmp_path / "list.txt").write_text("".join(f"imgs/{p.relative_to(tmp_path / 'imgs').as_posix()}\t"
                                               f"{p.relative_to(tmp_path / 'imgs').parts[0]}\n" for p in listed))
    out = tmp_path / "out"
    vit = ["--arch", "vit_tiny", "--patch_size", "4", "--vit_depth", "1", "--vit_embed_dim", "24"]
    argv = [*TINY, *vit, "--file_list", str(tmp_path / "list.txt"), "--max_steps", "2", "--num_workers", "0",
            "--attention_maps", "2", "--output_dir", str(out)]
    assert train_main(argv) == 0
    stdout = capsys.readouterr().out
    assert "k-NN top-1 at random init" in stdout and "after DINO (2 steps)" in stdout
    summary = (out / "summary.json").read_text()
    assert '"knn_top1"' in summary and '"steps": 2' in summary
    assert sorted(p.name for p in (out / "attention").iterdir()) == ["000", "001"]
    assert (out / "attention" / "000" / "img.png").exists()
    stored = load(out / "checkpoint.pth")["model_config"]["data"]
    assert stored["mean"] == [0.485, 0.456, 0.406] and stored["statistics"] == "default"  # RGB photos: ImageNet's
