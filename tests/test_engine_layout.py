"""One engine choice, two engines, and none of the removed CPU fast paths, kept by the suite."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from dino_pytorch.ops import engine_for
from dino_pytorch.ops.eager import EagerEngine

PACKAGE = Path(__file__).resolve().parents[1] / "dino_pytorch"


def sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_only_torch_compile_call_is_compile_forwards():
    calls = {name: len(re.findall(r"torch\.compile\(", text)) for name, text in sources().items()}
    assert {name: n for name, n in calls.items() if n} == {"dino_recipe.py": 2}  # the student and teacher forward
    text = sources()["dino_recipe.py"]
    body = text[text.index("def compile_forwards"):text.index("# -- resume in the official file layout")]
    assert body.count("torch.compile(") == 2


def test_no_removed_fast_path_remains():
    for name, text in sources().items():
        for word in ("overwrite_logits", "reused_buffer", "compiled.register", "DISABLE_COMPILE", "DISABLE_TRITON"):
            assert word not in text, f"{name} still mentions {word}"


def test_engines_are_built_only_where_they_are_chosen():
    builders = {name for name, text in sources().items() if re.search(r"\b(EagerEngine|TritonEngine)\(\)", text)}
    assert builders == {"ops/engine.py"}
    assert isinstance(engine_for(torch.zeros(2)), EagerEngine)
