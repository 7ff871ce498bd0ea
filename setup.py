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
    python_requires=">=3.9",
    packages=find_packages(include=["dino_pytorch", "dino_pytorch.*"]),
    package_data={"dino_pytorch": ["py.typed"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "einops>=0.7",
    ],
    extras_require={
        "dev": ["pytest>=7", "timm>=0.9", "tqdm>=4", "matplotlib>=3.5"],
        "train": ["tqdm>=4", "matplotlib>=3.5"],
        "timm": ["timm>=0.9"],
        "bench": ["psutil>=5"],
    },
    entry_points={
        "console_scripts": [
            "dino-train = dino_pytorch.cli.train:main",
            "dino-eval-knn = dino_pytorch.cli.eval_knn:main",
            "dino-eval-linear = dino_pytorch.cli.eval_linear:main",
            "dino-visualize-attention = dino_pytorch.cli.visualize_attention:main",
            "dino-plot-curves = dino_pytorch.cli.plot_curves:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "License :: OSI Approved :: Apache Software License",
    ],
)
