"""The package's shape, kept by the suite: small files, the library apart from the programs, and
a training program that is the library's own DINO plus a loop."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dino_pytorch"
# Deprecated modules that re-export from their new homes for one minor release; the programs'
# old entry points are among them, so these two may import dino_pytorch.cli.
SHIMS_INTO_PROGRAMS = {"train.py", "eval/common.py"}


def library_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_file_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


def test_library_never_imports_a_program():
    offenders = []
    for path in library_files():
        if str(path.relative_to(PACKAGE)) in SHIMS_INTO_PROGRAMS:
            continue
        if any(name == "dino_pytorch.cli" or name.startswith("dino_pytorch.cli.") for name in imported_modules(path)):
            offenders.append(str(path.relative_to(PACKAGE)))
    assert not offenders, f"library modules importing the programs: {offenders}"


def test_import_checker_sees_relative_imports():
    # The check above is only as good as the resolver: the train alias does import the program.
    assert "dino_pytorch.cli.train" in imported_modules(PACKAGE / "train.py")


def _functions(tree: ast.AST) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_training_program_is_dino_plus_a_loop():
    program = sorted((PACKAGE / "cli").glob("*.py"))
    built_by_hand = {"DINOLoss", "EMATeacher", "MultiCropWrapper", "DINOHead"}
    for path in program:
        tree = ast.parse(path.read_text())
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        called |= {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        assert not called & built_by_hand, f"{path.name} builds {called & built_by_hand} itself"
    functions = _functions(ast.parse((PACKAGE / "cli" / "train.py").read_text()))
    assert "DINO" in {n.func.id for n in ast.walk(functions["_main"]) if isinstance(n, ast.Call)
                      and isinstance(n.func, ast.Name)}
    for name in ("main", "_main"):
        node = functions[name]
        assert node.end_lineno - node.lineno + 1 <= 150, f"{name} is {node.end_lineno - node.lineno + 1} lines"


@pytest.mark.parametrize("module,name", [
    ("dino_pytorch.backbones", "as_feature_extractor"),
    ("dino_pytorch.visualize", "attention_maps"),
    ("dino_pytorch.visualize", "plot_curves"),
    ("dino_pytorch.eval.common", "eval_datasets"),
    ("dino_pytorch.transforms", "MultiCropTransform"),
    ("dino_pytorch.batched_transforms", "BatchedMultiCrop"),
])
def test_moved_modules_still_import_and_warn(module, name):
    import importlib
    import sys

    sys.modules.pop(module, None)
    with pytest.warns(DeprecationWarning, match="deprecated"):
        shim = importlib.import_module(module)
    assert callable(getattr(shim, name))


def test_the_package_imports_without_deprecation_warnings():
    import subprocess
    import sys

    code = (
        "import dino_pytorch, dino_pytorch.eval, dino_pytorch.models, dino_pytorch.checkpoint, "
        "dino_pytorch.cli.train"
    )
    result = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
