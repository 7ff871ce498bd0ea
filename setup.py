import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# The version lives in one place: dino_pytorch/_version.py.
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "dino_pytorch" / "_version.py").read_text()).group(1)

setup(
    name="dino-pytorch",
    version=VERSION,
    description="DINO self-supervised learning: composable, official-compatible, fast.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # What CI tests: Python 3.11 with torch 2.14.1 / torchvision 0.29.1 on the CPU (README, "Install options").
    python_requires=">=3.11",
    packages=find_packages(include=["dino_pytorch", "dino_pytorch.*"]),
    package_data={"dino_pytorch": ["py.typed"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "einops>=0.7",
        "numpy>=1.22",  # schedules, datasets
        "Pillow>=9.1",  # augmentation (Image.Resampling)
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-xdist>=3", "timm>=0.9", "tqdm>=4", "matplotlib>=3.5", "lightning>=2.2", "tensorboard>=2.12",
                "tifffile>=2023.1"],
        "train": ["tqdm>=4", "matplotlib>=3.5"],
        "timm": ["timm>=0.9"],
        "lightning": ["lightning>=2.2"],
        "tensorboard": ["tensorboard>=2.12"],
        "tiff": ["tifffile>=2023.1"],  # multi-band TIFF for dino_pytorch.data (docs/own-data.md)
        "bench": ["psutil>=5"],
        # the documentation site (`make docs`): the versions it is built and tested with
        "docs": ["mkdocs==1.6.1", "mkdocs-material==9.8.2", "mkdocstrings[python]==1.0.8", "mkdocstrings-python==2.0.11"],
    },
    entry_points={
        "console_scripts": [
            "dino-train = dino_pytorch.cli.train:main",
            "dino-eval-knn = dino_pytorch.cli.eval_knn:main",
            "dino-eval-linear = dino_pytorch.cli.eval_linear:main",
            "dino-visualize-attention = dino_pytorch.cli.visualize_attention:main",
            "dino-plot-curves = dino_pytorch.cli.plot_curves:main",
            "dino-export = dino_pytorch.cli.export:main",
        ]
    },
    classifiers=[
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
