"""Band files: .npy and TIFF of 1, 4 and 13 bands, both layouts, integer / float / boolean dtypes,
mapped to [0, 1] (compared with a naive float64 map), the value-range rules, and a DINO step on
views cut from them."""
import sys

import numpy as np
import pytest
import torch

from dino_pytorch import DINO
from dino_pytorch.data import (
    DecodeError,
    ImageFiles,
    ValueRangeNeeded,
    check_value_range,
    read_npy,
    read_tiff,
    to_chw,
    to_unit_range,
)
from dino_pytorch.models import create_model
from own_data_cases import write_bands

RNG = np.random.default_rng(0)
DTYPE_RANGES = {np.uint8: (0, 255), np.uint16: (0, 65535), np.int16: (-32768, 32767), np.int8: (-128, 127)}


def naive_unit(chw, ranges):
    """Each band's value scaled from its (low, high) to [0, 1], clipped, one number at a time (float64)."""
    out = np.empty(chw.shape, np.float64)
    for c in range(chw.shape[0]):
        low, high = ranges[c]
        for (i, j), v in np.ndenumerate(chw[c]):
            out[c, i, j] = min(max((float(v) - low) / (high - low), 0.0), 1.0)
    return out


def random_bands(bands, dtype, h=17, w=15):  # sides above the band count: the layout rule needs it
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return RNG.integers(info.min, int(info.max) + 1, (bands, h, w), dtype=dtype)
    return RNG.normal(3.0, 2.0, (bands, h, w)).astype(dtype)


@pytest.mark.parametrize("bands", [1, 4, 13])
@pytest.mark.parametrize("suffix", [".npy", ".tif"])
@pytest.mark.parametrize("layout", ["chw", "hwc"])
def test_band_files_read_in_both_layouts_and_map_by_dtype_range(tmp_path, bands, suffix, layout):
    dtype = np.uint16 if bands == 4 else (np.int16 if bands == 13 else np.uint8)
    chw = random_bands(bands, dtype)
    stored = chw[0] if bands == 1 else (chw if layout == "chw" else chw.transpose(1, 2, 0))
    path = write_bands(tmp_path / f"x{suffix}", np.ascontiguousarray(stored))
    read = (read_npy if suffix == ".npy" else read_tiff)(path)
    assert read.shape == (bands, 17, 15) and read.dtype == dtype and np.array_equal(read, chw)
    files = ImageFiles.from_folder(tmp_path)
    assert files.channels == bands and not files.photos and not files.float_bands
    image, label = files[0]
    assert label == -1 and image.dtype == torch.float32 and image.shape == (bands, 17, 15)
    expected = naive_unit(chw, [DTYPE_RANGES[dtype]] * bands)
    torch.testing.assert_close(image.double(), torch.from_numpy(expected), atol=1e-7, rtol=0)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_layout_rule_first_or_last_axis_and_ties():
    assert to_chw(np.zeros((13, 64, 64))).shape == (13, 64, 64)
    assert to_chw(np.zeros((64, 64, 13))).shape == (13, 64, 64)
    assert to_chw(np.zeros((4, 8, 4))).shape == (4, 8, 4)  # a tie: the first axis is the channel axis
    assert to_chw(np.zeros((13, 9, 7))).shape == (7, 13, 9)  # images smaller than their band count misread
    assert to_chw(np.zeros((8, 5))).shape == (1, 8, 5)
    hwc = np.arange(2 * 3 * 5).reshape(2, 3, 5)  # 5 > 2: (C=2, H=3, W=5) is read as is
    assert np.array_equal(to_chw(hwc), hwc)
    with pytest.raises(DecodeError, match=r"shape \(2, 3, 4, 5\)"):
        to_chw(np.zeros((2, 3, 4, 5)))
    with pytest.raises(DecodeError, match="dtype complex128"):
        to_chw(np.zeros((3, 4, 4), np.complex128))


@pytest.mark.parametrize("dtype", [np.int8, np.float32, np.float64, np.bool_])
def test_value_ranges_given_per_band_or_for_all(dtype):
    chw = RNG.integers(-5, 6, (3, 4, 5)).astype(dtype)
    given = ((-2.0, 2.0), (0.0, 10.0), (-5.0, 5.0))
    expected = naive_unit(chw, given)
    torch.testing.assert_close(to_unit_range(chw, check_value_range(given, 3)).double(), torch.from_numpy(expected),
                               atol=1e-7, rtol=0)  # values outside a range are clipped to 0 or 1
    one = check_value_range((-1, 1), 3)
    assert one == ((-1.0, 1.0),) * 3
    if dtype == np.bool_:
        torch.testing.assert_close(to_unit_range(chw).double(), torch.from_numpy(chw.astype(np.float64)))
    elif dtype == np.int8:
        expected = naive_unit(chw, [(-128, 127)] * 3)
        torch.testing.assert_close(to_unit_range(chw).double(), torch.from_numpy(expected), atol=1e-7, rtol=0)
    else:
        with pytest.raises(ValueError, match="float data .* need a value_range"):
            to_unit_range(chw)
    assert not np.shares_memory(to_unit_range(chw, one).numpy(), chw)


def test_value_range_errors_name_the_value():
    with pytest.raises(ValueError, match=r"band 1 has low 3.0, high 3.0"):
        check_value_range([(0, 1), (3, 3)])
    with pytest.raises(ValueError, match="expected \\(low, high\\)"):
        check_value_range("0 1")
    with pytest.raises(ValueError, match="2 \\(low, high\\) pairs for 4 bands"):
        check_value_range([(0, 1), (0, 2)], 4)
    with pytest.raises(DecodeError, match="NaN"):
        to_unit_range(np.full((1, 2, 2), np.nan, np.float32), ((0.0, 1.0),))


def test_float_band_files_need_a_range_and_odd_files_are_replaced(tmp_path):
    write_bands(tmp_path / "a.npy", RNG.normal(0, 1, (4, 6, 6)).astype(np.float32))
    write_bands(tmp_path / "b.npy", np.full((4, 6, 6), np.nan, np.float32))
    files = ImageFiles.from_folder(tmp_path, report_failures=True)
    assert files.float_bands and files.channels == 4
    with pytest.raises(ValueRangeNeeded, match="a.npy: float band data"):
        files[0]
    ranged = files.with_value_range((-1.0, 1.0))
    image, _, replaced = ranged[1]
    assert replaced.startswith("b.npy\tDecodeError") and "NaN" in replaced
    torch.testing.assert_close(image, ranged[0][0])  # the only good file stands in
    assert files.value_range is None  # the copy left the original alone


def test_tiff_without_tifffile_says_how_to_install(tmp_path, monkeypatch):
    path = write_bands(tmp_path / "x.tiff", np.zeros((3, 4, 4), np.uint8))
    monkeypatch.setitem(sys.modules, "tifffile", None)
    with pytest.raises(ImportError, match=r"pip install 'dino-pytorch\[tiff\]'"):
        read_tiff(path)
    with pytest.raises(ImportError, match="tifffile"):
        ImageFiles.from_folder(tmp_path)  # a missing package is never taken for a corrupt file


@pytest.mark.parametrize("bands", [1, 4, 13])
def test_band_images_through_dino(tmp_path, bands):
    # Views cut from the [0, 1] images by hand (two globals, one local), normalised per band:
    # a DINO step of a band-count ViT is finite and moves the student.
    for i in range(4):
        write_bands(tmp_path / f"{i}.tif", random_bands(bands, np.uint16, 16, 16).transpose(1, 2, 0))
    files = ImageFiles.from_folder(tmp_path)
    images = torch.stack([files[i][0] for i in range(len(files))])
    mean, std = images.mean(dim=(0, 2, 3), keepdim=True), images.std(dim=(0, 2, 3), keepdim=True)
    norm = (images - mean) / std
    views = [norm[:, :, :12, :12], norm[:, :, 4:, 4:].flip(-1), norm[:, :, 2:10, 2:10]]
    backbone = create_model("vit_tiny", patch_size=4, in_chans=bands, img_size=12, depth=1, embed_dim=24)
    torch.manual_seed(0)
    dino = DINO(backbone, out_dim=32, hidden_dim=16, bottleneck_dim=8, input_size=(bands, 12, 12))
    before = [p.detach().clone() for p in dino.student.parameters()]
    optimizer = torch.optim.SGD(dino.param_groups(), lr=0.1)
    loss = dino(views, 0)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, dino.student.parameters()))
    with pytest.raises(ValueError, match=f"backbone takes in_chans={bands}"):
        dino([v[:, :1].expand(-1, bands + 1, -1, -1) for v in views], 0)
