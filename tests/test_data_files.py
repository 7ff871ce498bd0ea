"""ImageFiles: folders with and without class subfolders, file lists, corrupt files and their
deterministic replacement, photos as PIL RGB images and 16-bit PNGs as one band."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dino_pytorch.data import DecodeError, ImageFiles, read_file_list, replacement_index
from dino_pytorch.datasets import SeededTransform
from own_data_cases import labelled_photos, write_bands, write_corrupt, write_photo


def test_flat_folder_is_unlabelled_sorted_and_reads_photos_as_rgb(tmp_path):
    rng = np.random.default_rng(0)
    pixels = {}
    for name in ("b.JPG", "a.png", "c.webp", "d.BMP", "e.jpeg"):
        pixels[name] = write_photo(tmp_path / name, rng)
    (tmp_path / "notes.txt").write_text("not an image")
    write_photo(tmp_path / "sub" / "f.png", rng, mode="L")  # makes it mixed: still no labels (a.png is in the root)
    files = ImageFiles.from_folder(tmp_path)
    assert files.names == ["a.png", "b.JPG", "c.webp", "d.BMP", "e.jpeg", "sub/f.png"]
    assert not files.labelled and files.classes == [] and files.channels == 3 and files.photos
    for i, name in enumerate(files.names[:5]):
        image, label = files[i]
        assert label == -1 and isinstance(image, Image.Image) and image.mode == "RGB"
        if name.lower().endswith((".png", ".bmp")):  # lossless: the very pixels written
            assert np.array_equal(np.asarray(image), pixels[name])
    grey, _ = files[5]
    assert grey.mode == "RGB"  # a grey photo becomes RGB, as ImageFolder gives it


def test_nested_folder_labels_from_the_first_level_subfolder(tmp_path):
    labelled_photos(tmp_path, per_class=4, classes=("zebra", "ant"))
    files = ImageFiles.from_folder(tmp_path)
    assert files.classes == ["ant", "zebra"]  # sorted class names give the indices
    assert files.names == sorted(files.names) and len(files) == 8
    assert "ant/deeper/02.png" in files.names  # a deeper file still belongs to its first-level folder
    expected = [files.classes.index(name.split("/")[0]) for name in files.names]
    assert files.labels == expected == [files[i][1] for i in range(len(files))]


def test_file_list_resolves_relative_paths_labels_and_refuses_a_mix(tmp_path):
    rng = np.random.default_rng(1)
    write_photo(tmp_path / "imgs" / "x.png", rng)
    write_photo(tmp_path / "imgs" / "y.png", rng)
    outside = write_photo(tmp_path / "elsewhere" / "z.png", rng)
    lists = tmp_path / "lists"
    lists.mkdir()
    absolute = str(tmp_path / "elsewhere" / "z.png")
    (lists / "plain.txt").write_text(f"# a comment\n../imgs/y.png\n\n../imgs/x.png\n{absolute}\n")
    files = ImageFiles.from_file_list(lists / "plain.txt")
    assert files.names == sorted(["../imgs/y.png", "../imgs/x.png", absolute])
    assert not files.labelled
    assert np.array_equal(np.asarray(files[files.names.index(absolute)][0]), outside)
    (lists / "labelled.txt").write_text(f"../imgs/x.png\tsky\n../imgs/y.png\tsea\n{absolute}\tsky\n")
    files = ImageFiles.open(lists / "labelled.txt")
    assert files.classes == ["sea", "sky"]
    assert [files.classes[y] for y in files.labels] == [dict(x="sky", y="sea", z="sky")[Path(n).stem]
                                                        for n in files.names]
    (lists / "mixed.txt").write_text("../imgs/x.png\tsky\n../imgs/y.png\n")
    with pytest.raises(ValueError, match=r"line 2 \('../imgs/y.png'\): no class"):
        read_file_list(lists / "mixed.txt")
    (lists / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no paths"):
        ImageFiles.from_file_list(lists / "empty.txt")


def test_corrupt_files_are_replaced_by_index_and_attempt_and_named(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(6):
        write_photo(tmp_path / f"{i}.png", rng)
    write_corrupt(tmp_path / "6.jpg")
    write_corrupt(tmp_path / "7.png", kind="truncated")
    write_bands(tmp_path / "8.npy", np.zeros((4, 20, 24), np.uint8))  # 4 channels among RGB photos
    write_photo(tmp_path / "9.png", rng, size=(2, 2))  # too small for min_pixels
    files = ImageFiles.from_folder(tmp_path, report_failures=True, min_pixels=20)
    bad = {"6.jpg", "7.png", "8.npy", "9.png"}
    reasons = {"6.jpg": "UnidentifiedImageError", "7.png": "OSError", "8.npy": "4 channels, the data have 3",
               "9.png": "4 pixels, fewer than the 20"}
    for index in range(len(files)):
        image, label, replaced = files[index]
        # The naive chain: attempt k replaces the current file by replacement_index(index, k).
        expected, current, attempt = [], index, 0
        while files.names[current] in bad:
            expected.append(files.names[current])
            attempt += 1
            current = replacement_index(index, attempt, len(files))
        lines = [line.split("\t") for line in replaced.split("\n")] if replaced else []
        assert [n for n, _ in lines] == expected
        for n, reason in lines:
            assert reasons[n] in reason
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / files.names[current]).convert("RGB")))
        assert files[index][2] == replaced  # the same stand-in every time: resume draws the same
    strict = files.copy(replace_failures=False)
    with pytest.raises(DecodeError, match="6.jpg: cannot read it"):
        strict[files.names.index("6.jpg")]


def test_replaced_names_travel_through_dataloader_workers(tmp_path):
    rng = np.random.default_rng(3)
    for i in range(5):
        write_photo(tmp_path / f"{i}.png", rng, size=(8, 8))
    write_corrupt(tmp_path / "5.png")
    files = ImageFiles.from_folder(tmp_path, report_failures=True)
    to_tensor = lambda im: torch.from_numpy(np.asarray(im)).permute(2, 0, 1)  # noqa: E731
    seeded = SeededTransform(files, to_tensor, seed=0, return_key=True)
    batches = list(DataLoader(seeded, batch_size=3, num_workers=2))
    replaced = [entry for batch in batches for entry in batch[3]]
    keys = [k for batch in batches for k in batch[2].tolist()]
    assert keys == list(range(6))
    assert [bool(entry) for entry in replaced] == [False] * 5 + [True]
    assert replaced[5].startswith("5.png\tUnidentifiedImageError")


def test_deep_pngs_are_one_band_and_rgba_photos_drop_alpha(tmp_path):
    deep = (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    files = ImageFiles.from_folder(tmp_path)
    assert files.channels == 1 and not files.photos
    image, _ = files[0]
    assert image.dtype == torch.float32 and image.shape == (1, 12, 10)
    torch.testing.assert_close(image[0].double(), torch.from_numpy(deep.astype(np.float64) / 65535), atol=1e-7, rtol=0)
    rgba = tmp_path / "rgba"
    pixels = write_photo(rgba / "a.png", np.random.default_rng(4), mode="RGBA")
    image, _ = ImageFiles.from_folder(rgba)[0]
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels)


def test_clear_errors_for_empty_folders_and_unreadable_data(tmp_path):
    with pytest.raises(ValueError, match="no image files under it"):
        ImageFiles.from_folder(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        ImageFiles.from_folder(tmp_path / "missing")
    for i in range(3):
        write_corrupt(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match="none of the first 3 files decodes"):
        ImageFiles.from_folder(tmp_path)
    with pytest.raises(RuntimeError, match="files in a row failed to decode"):
        ImageFiles.from_folder(tmp_path, channels=3)[0]
    write_photo(tmp_path / "ok.png", np.random.default_rng(5))
    with pytest.raises(TypeError, match=r"copy\(colour=...\): not attributes"):
        ImageFiles.from_folder(tmp_path).copy(colour=1)
    assert os.path.exists(tmp_path / "ok.png")
