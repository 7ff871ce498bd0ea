"""Every ```python block of README.md and docs/quickstart.md runs as pasted.

Each block runs in its own Python process (a fresh namespace, a timeout) from an empty folder, and
imports this checkout's package. A block whose first line starts with ``# fragment`` is incomplete
by design (it continues an earlier block, or needs a data set, a GPU or torchrun): it is only
compiled. The README's three-line block gets a ``backbone`` and ``views`` in front of it. Every
block is compiled in the default suite; running them is marked slow.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", ROOT / "docs" / "quickstart.md"]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
THREE_LINES = re.compile(r"<!-- three-lines:start -->\s*```python\n(.*?)```\s*<!-- three-lines:end -->", re.S)
THREE_LINES_PRELUDE = """\
import torch, torchvision
from dino_pytorch import DINO
backbone = torchvision.models.resnet18(weights=None)
views = [torch.randn(4, 3, 64, 64) for _ in range(2)] + [torch.randn(4, 3, 32, 32) for _ in range(2)]
"""
TIMEOUT_S = 120


def blocks():
    found = []
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        three = THREE_LINES.search(text)
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            code = match.group(1)
            kind = "run"
            if code.lstrip().startswith("# fragment"):
                kind = "fragment"
            elif three is not None and three.start(1) == match.start(1):
                kind = "three-lines"
            found.append(pytest.param(path, code, kind, id=f"{path.relative_to(ROOT)}:{line}"))
    return found


BLOCKS = blocks()


def test_blocks_found():
    names = {p.values[0].name for p in BLOCKS}
    assert names == {"README.md", "quickstart.md"}
    kinds = [p.values[2] for p in BLOCKS]
    assert kinds.count("three-lines") == 1, "README lost its three-line block"
    assert kinds.count("run") >= 4
    # fragments are the exception: most blocks must run as pasted
    assert kinds.count("fragment") <= kinds.count("run")


def test_every_block_compiles():
    # The quick half of the check, in the default suite: a syntax error in any block (a fragment
    # included) fails here without starting a process.
    for p in BLOCKS:
        compile(p.values[1], f"{p.id} block", "exec")


# Each run starts Python, imports torch and trains or evaluates a model: 4 to 40 s a block.
@pytest.mark.slow
@pytest.mark.parametrize("path, code, kind", [p for p in BLOCKS if p.values[2] != "fragment"])
def test_block_runs(path, code, kind, tmp_path):
    if kind == "three-lines":
        code = THREE_LINES_PRELUDE + code
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this checkout
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, f"{path.name} block failed:\n{code}\n--- stderr ---\n{result.stderr[-3000:]}"
