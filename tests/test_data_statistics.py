"""sample_statistics against a naive float64 computation on the same sample (photos, grey, integer
and float bands, uint8 tensors), the measured value range, and the evaluation transform and sets of
own data."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset, TensorDataset
from torchvision import transforms as T

from dino_pytorch.data import (
    EvalTransform,
    ImageFiles,
    is_labelled,
    own_eval_sets,
    sample_indices,
    sample_statistics,
)
from dino_pytorch.data.eval_sets import VAL_EVERY
from own_data_cases import labelled_photos, write_bands, write_corrupt, write_photo


def naive_stats(images):
    """Per-channel mean and population std of every pixel of ``images`` ((C, H, W) float64 arrays)."""
    pixels = np.concatenate([im.reshape(im.shape[0], -1) for im in images], axis=1)
    return pixels.mean(axis=1), np.sqrt(((pixels - pixels.mean(axis=1, keepdims=True)) ** 2).mean(axis=1))


def test_sample_indices_are_seeded_sorted_and_capped():
    a = sample_indices(5000, 1000, seed=3)
    assert a == sample_indices(5000, 1000, seed=3) and a == sorted(a) and len(set(a)) == 1000
    assert a != sample_indices(5000, 1000, seed=4)
    expected = sorted(torch.randperm(5000, generator=torch.Generator().manual_seed(3))[:1000].tolist())
    assert a == expected
    assert sample_indices(7, 1000) == list(range(7))


@pytest.mark.parametrize("channels", [3, 1])
def test_photo_statistics_equal_a_naive_float64_computation(tmp_path, channels):
    rng = np.random.default_rng(0)
    for i in range(9):
        write_photo(tmp_path / f"{i}.png", rng, size=(10 + i, 12), level=40.0 + 20 * i)  # sizes differ: pixel-weighted
    write_corrupt(tmp_path / "9.png")
    files = ImageFiles.from_folder(tmp_path)
    stats = sample_statistics(files, sample=6, seed=2, channels=channels)
    indices = sample_indices(len(files), 6, seed=2)
    assert 9 in indices  # the corrupt file is drawn, and skipped
    good = [i for i in indices if files.names[i] != "9.png"]
    mode = "L" if channels == 1 else "RGB"
    images = [np.asarray(Image.open(tmp_path / files.names[i]).convert(mode), np.float64).reshape(
        *Image.open(tmp_path / files.names[i]).size[::-1], -1).transpose(2, 0, 1) / 255.0 for i in good]
    mean, std = naive_stats(images)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(stats.std, std, rtol=1e-12)
    assert stats.images == len(good) and stats.value_range is None
    assert stats.skipped == ("9.png",)


def test_float_band_statistics_measure_the_value_range_first(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.normal(100.0 * c, 5.0 + c, (4, 8 + i, 9)).astype(np.float32) for i, c in enumerate(range(6))]
    arrays = [a + np.arange(4, dtype=np.float32)[:, None, None] * 1000 for a in arrays]
    for i, a in enumerate(arrays):
        write_bands(tmp_path / f"{i}.npy", a if i % 2 else a.transpose(1, 2, 0))
    files = ImageFiles.from_folder(tmp_path)
    stats = sample_statistics(files, sample=4, seed=0)
    chosen = [arrays[i].astype(np.float64) for i in sample_indices(6, 4, seed=0)]
    low = np.min([a.min(axis=(1, 2)) for a in chosen], axis=0)
    high = np.max([a.max(axis=(1, 2)) for a in chosen], axis=0)
    assert stats.value_range == tuple(zip(low.tolist(), high.tolist()))
    mapped = [(a - low[:, None, None]) / (high - low)[:, None, None] for a in chosen]
    mean, std = naive_stats(mapped)
    # The files go through float32 on their way to [0, 1] (what the normaliser sees), the naive map stays float64.
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(stats.std, std, rtol=1e-5)
    assert files.value_range is None


def test_integer_bands_and_uint8_tensor_datasets(tmp_path):
    rng = np.random.default_rng(2)
    arrays = [rng.integers(0, 65536, (13, 16, 15), dtype=np.uint16) for _ in range(3)]
    for i, a in enumerate(arrays):
        write_bands(tmp_path / f"{i}.tif", a)
    stats = sample_statistics(ImageFiles.from_folder(tmp_path))
    mean, std = naive_stats([a.astype(np.float64) / 65535.0 for a in arrays])
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(stats.std, std, rtol=1e-6)
    grey = torch.from_numpy(rng.integers(0, 256, (5, 1, 6, 6), dtype=np.uint8))
    tensors = TensorDataset(grey, torch.zeros(5))
    stats = sample_statistics(tensors, channels=3)  # grey repeated to RGB, as the augmenters do
    mean, std = naive_stats([g.numpy().astype(np.float64) / 255.0 for g in grey])
    np.testing.assert_allclose(stats.mean, [mean[0]] * 3, rtol=1e-12)
    np.testing.assert_allclose(stats.std, [std[0]] * 3, rtol=1e-12)


def test_a_constant_channel_is_refused(tmp_path):
    a = np.random.default_rng(3).integers(0, 255, (3, 8, 8), dtype=np.uint8)
    a[1] = 7
    write_bands(tmp_path / "a.npy", a)
    with pytest.raises(ValueError, match="channel 1 is constant"):
        sample_statistics(ImageFiles.from_folder(tmp_path))


def test_eval_transform_is_the_official_one_on_photos_and_the_same_steps_on_bands():
    rng = np.random.default_rng(4)
    photo = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    official = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                          T.Normalize(mean, std)])
    assert torch.equal(EvalTransform(224, mean, std)(photo), official(photo))
    bands = torch.from_numpy(rng.random((4, 40, 37), dtype=np.float32))
    m, s = (0.1, 0.2, 0.3, 0.4), (0.5, 0.6, 0.7, 0.8)
    view = EvalTransform(32, m, s)(bands)  # short side 37 = round(32 * 256 / 224): only the centre crop acts
    top, left = round((40 - 32) / 2), round((37 - 32) / 2)
    naive = (bands[:, top:top + 32, left:left + 32] - torch.tensor(m)[:, None, None]) / torch.tensor(s)[:, None, None]
    torch.testing.assert_close(view, naive, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="4 channels; the evaluation takes 3"):
        EvalTransform(32, mean, std)(bands)


def test_own_eval_sets_split_remap_and_check_channels(tmp_path):
    labelled_photos(tmp_path / "all", per_class=12)
    train, val = own_eval_sets(str(tmp_path / "all"), channels=3, image_size=16)
    files = ImageFiles.from_folder(tmp_path / "all")
    assert list(val.indices) == list(range(0, 24, VAL_EVERY))
    assert list(train.indices) == [i for i in range(24) if i % VAL_EVERY]
    x, y = val[1]
    assert x.shape == (3, 16, 16) and y == files.labels[VAL_EVERY]
    assert is_labelled(train) and is_labelled(Subset(val, [0]))
    labelled_photos(tmp_path / "val", per_class=2, classes=("dog",))  # one class only: index 1 in train's order
    train, val = own_eval_sets(str(tmp_path / "all"), str(tmp_path / "val"), channels=1, image_size=16)
    assert val.classes == ["cat", "dog"] and set(val.labels) == {1}
    assert val[0][0].shape == (1, 16, 16)  # photos converted to grey for a 1-channel model
    write_photo(tmp_path / "flat" / "a.png", np.random.default_rng(5))
    assert not is_labelled(own_eval_sets(str(tmp_path / "flat"), channels=3, image_size=16)[0])
    with pytest.raises(ValueError, match="images of 3 channels, and the model takes 4"):
        own_eval_sets(str(tmp_path / "flat"), channels=4, image_size=16)
