"""Band files of 1, 4 and 13 bands (.npy and TIFF) through both augmenters and DINO, and dino-train
on a labelled folder of float band files: the measured value range and statistics in the checkpoint,
which dino-eval-knn reads."""
import warnings

import numpy as np
import pytest
import torch

from dino_pytorch import DINO, BatchedMultiCrop, MultiCropRecipe, MultiCropTransform
from dino_pytorch.cli._setup import eval_setup
from dino_pytorch.cli.eval_knn import build_parser
from dino_pytorch.cli.eval_knn import evaluate as eval_knn
from dino_pytorch.cli.train import main as train_main
from dino_pytorch.data import ImageFiles, sample_statistics
from dino_pytorch.datasets import sample_seeds
from dino_pytorch.models import create_model
from own_data_cases import write_bands
from train_cases import load

SIZE = 20
# Every random step off and the crop the whole image at its own size: a view is the normalised image.
IDENTITY = dict(global_crops_scale=(1.0, 1.0), local_crops_scale=(1.0, 1.0), local_crops_number=1,
                global_crop_size=SIZE, local_crop_size=SIZE, ratio=(1.0, 1.0), flip_prob=0.0, color_jitter_prob=0.0,
                grayscale_prob=0.0, global_blur_probs=(0.0, 0.0), local_blur_prob=0.0,
                global_solarize_probs=(0.0, 0.0), local_solarize_prob=0.0)


def band_folder(root, bands, suffix, count=4, dtype=np.uint16):
    rng = np.random.default_rng(bands)
    arrays = []
    for i in range(count):
        a = rng.integers(0, 65536, (bands, SIZE, SIZE)).astype(dtype)
        arrays.append(a)
        write_bands(root / f"{i}{suffix}", a if i % 2 else a.transpose(1, 2, 0))
    return ImageFiles.from_folder(root), arrays


@pytest.mark.parametrize("bands", [1, 4, 13])
@pytest.mark.parametrize("suffix", [".npy", ".tif"])
def test_band_files_through_both_augmenters_and_dino(tmp_path, bands, suffix):
    files, arrays = band_folder(tmp_path, bands, suffix)
    stats = sample_statistics(files)
    identity = MultiCropRecipe(mean=stats.mean, std=stats.std, **IDENTITY)
    mean, std = torch.tensor(stats.mean)[:, None, None], torch.tensor(stats.std)[:, None, None]
    images = torch.stack([files[i][0] for i in range(len(files))])
    for i, array in enumerate(arrays):
        naive = (torch.from_numpy(array.astype(np.float64) / 65535).float() - mean) / std
        for view in MultiCropTransform(recipe=identity)(files[i][0]):
            torch.testing.assert_close(view, naive, atol=1e-5, rtol=0)
    for view in BatchedMultiCrop(recipe=identity)(images, seeds=sample_seeds(0, torch.arange(len(files)))):
        naive = (torch.from_numpy(np.stack(arrays).astype(np.float64) / 65535).float() - mean) / std
        torch.testing.assert_close(view, naive, atol=1e-5, rtol=0)
    # The official recipe (its colour steps skipped for C != 3, with a note), crops 16 / 8, into DINO.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = MultiCropRecipe(mean=stats.mean, std=stats.std, local_crops_number=2, global_crop_size=16,
                                 local_crop_size=8)
        per_image, batched = MultiCropTransform(recipe=recipe), BatchedMultiCrop(recipe=recipe)
    assert any("skipped" in str(w.message) for w in caught) == (bands not in (1, 3))
    torch.manual_seed(0)
    views = [torch.stack(v) for v in zip(*(per_image(files[i][0]) for i in range(len(files))))]
    batched_views = batched(images, seeds=sample_seeds(0, torch.arange(len(files))))
    for a, b in zip(views, batched_views):
        assert a.shape == b.shape and a.shape[1] == bands and torch.isfinite(a).all() and torch.isfinite(b).all()
    assert [v.shape[-1] for v in views] == [16, 16, 8, 8]
    backbone = create_model("convnet", in_chans=bands, width=8)
    dino = DINO(backbone, out_dim=32, hidden_dim=16, bottleneck_dim=8, input_size=(bands, 16, 16))
    for v in (views, batched_views):
        assert torch.isfinite(dino(v, 0))


def test_dino_train_on_float_band_files_stores_the_range_and_eval_knn_reads_it(tmp_path, capsys):
    # 2 classes x 12 float32 4-band TIFFs in class folders: the run measures each band's range and
    # the statistics through it (stored in the checkpoint); the k-NN programs read the bands with them.
    rng = np.random.default_rng(7)
    arrays = []
    for c, name in enumerate(("fields", "water")):
        for i in range(12):
            a = (rng.normal(0.2 + 0.5 * c, 0.1, (4, SIZE, SIZE)) * np.array([1, 10, 100, 1000])[:, None, None])
            arrays.append(a.astype(np.float32))
            write_bands(tmp_path / "data" / name / f"{i:02d}.tif", arrays[-1])
    out = tmp_path / "out"
    argv = ["--data_path", str(tmp_path / "data"), "--arch", "convnet", "--width", "8", "--out_dim", "64",
            "--hidden_dim", "32", "--bottleneck_dim", "16", "--batch_size_per_gpu", "4", "--local_crops_number", "2",
            "--global_crop_size", "16", "--local_crop_size", "8", "--num_workers", "0", "--no_progress",
            "--max_steps", "2", "--warmup_epochs", "0", "--output_dir", str(out), "--attention_maps", "0"]
    assert train_main(argv) == 0
    stdout = capsys.readouterr().out
    assert "value range per band" in stdout and "after DINO (2 steps)" in stdout
    stored = load(out / "checkpoint.pth")["model_config"]["data"]
    low = np.min([a.min(axis=(1, 2)) for a in arrays], axis=0).astype(np.float64)
    high = np.max([a.max(axis=(1, 2)) for a in arrays], axis=0).astype(np.float64)
    assert stored["value_range"] == [[lo, hi] for lo, hi in zip(low.tolist(), high.tolist())]
    assert stored["in_chans"] == 4 and len(stored["mean"]) == len(stored["std"]) == 4
    mapped = np.concatenate([((a - low[:, None, None]) / (high - low)[:, None, None]).reshape(4, -1) for a in arrays],
                            axis=1)
    np.testing.assert_allclose(stored["mean"], mapped.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(stored["std"], mapped.std(axis=1), rtol=1e-5)
    eval_argv = ["--pretrained_weights", str(out / "checkpoint.pth"), "--train_data", str(tmp_path / "data"),
                 "--val_data", str(tmp_path / "data"), "--nb_knn", "1", "--num_workers", "0"]
    _, train_set, _, _ = eval_setup(build_parser().parse_args(eval_argv), train_augment=False)
    assert train_set.value_range == tuple(map(tuple, stored["value_range"]))  # the training's map, not re-measured
    assert train_set.transform.mean == tuple(stored["mean"]) and train_set.transform.std == tuple(stored["std"])
    first = (arrays[0].astype(np.float64) - low[:, None, None]) / (high - low)[:, None, None]
    read = train_set.copy(transform=None)[0][0]
    torch.testing.assert_close(read.double(), torch.from_numpy(first), atol=1e-6, rtol=0)
    results = eval_knn(eval_argv)
    assert results[1][0] == 100.0  # every query is in the bank: its own nearest neighbour
