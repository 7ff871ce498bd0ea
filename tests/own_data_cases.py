"""What the own-data tests share: tiny folders of photos, band files and corrupt files, written with
a fixed generator, so each test reads files whose values it knows."""
from pathlib import Path

import numpy as np
from PIL import Image


def write_photo(path, rng, size=(20, 24), mode="RGB", level=128.0):
    """A noisy photo of ``size`` (h, w) around ``level`` in ``mode``; returns its RGB uint8 pixels (h, w, 3)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(rng.normal(level, 40.0, (*size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, size, dtype=np.uint8)
        image = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    with Image.open(path) as saved:
        return np.asarray(saved.convert("RGB"))


def write_bands(path, array):
    """``array`` as a .npy or (through tifffile) a .tif / .tiff file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".npy":
        np.save(path, array)
    else:
        import tifffile

        # Bands as grey samples: planes first for (C, H, W), interleaved for (H, W, C); one band as (H, W).
        if array.ndim == 3 and 1 in (array.shape[0], array.shape[2]):
            array = array.reshape(array.shape[1], -1) if array.shape[0] == 1 else array[..., 0]
        planes = array.ndim == 3 and array.shape[0] < array.shape[2]
        layout = {} if array.ndim == 2 else {"planarconfig": "separate" if planes else "contig"}
        tifffile.imwrite(path, array, photometric="minisblack", **layout)
    return path


def write_corrupt(path, kind="garbage"):
    """An undecodable file: random bytes, or a PNG cut short (header intact, pixels missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        full = path.with_name("full-" + path.name)
        write_photo(full, np.random.default_rng(0), size=(64, 64))
        path.write_bytes(full.read_bytes()[:200])
        full.unlink()
    else:
        path.write_bytes(b"\x00not an image\xff" * 3)
    return path


def labelled_photos(root, per_class=6, size=(20, 24), seed=0, classes=("cat", "dog")):
    """root/<class>/*.png (some one folder deeper), the classes far apart in brightness."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        for i in range(per_class):
            sub = "deeper/" if i % 3 == 2 else ""
            write_photo(Path(root, name, f"{sub}{i:02d}.png"), rng, size, level=50.0 + 150.0 * c)
    return Path(root)
