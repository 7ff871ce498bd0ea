"""The package's shape, kept by the suite: small files and functions, the library apart from the
programs, no deprecated shims, and a training program that is the library's own DINO plus a loop."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dino_pytorch"
# `python -m dino_pytorch.train`, the one entry README, the demo and the recipes use: the only library
# file that may import dino_pytorch.cli.
PROGRAM_ENTRY = "train.py"
# Names of version 0.1.0, which was never published: they moved without a shim.
NEVER_PUBLISHED = ("transforms.py", "batched_transforms.py", "visualize.py", "backbones.py", "eval/common.py")
MAX_FUNCTION_LINES = 80


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
        if str(path.relative_to(PACKAGE)) == PROGRAM_ENTRY:
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
    trainer = ast.parse((PACKAGE / "cli" / "train.py").read_text())
    assert "DINO" in {n.func.id for n in ast.walk(_functions(trainer)["_main"]) if isinstance(n, ast.Call)
                      and isinstance(n.func, ast.Name)}
    # The demo's pictures and numbers hang on the trainer as a hook (cli/demo_report.py), not inside it.
    names = {n.id for n in ast.walk(trainer) if isinstance(n, ast.Name)}
    names |= {alias.name for n in ast.walk(trainer) if isinstance(n, ast.ImportFrom) for alias in n.names}
    assert not names & {"raw_pixel_knn", "garment_attention", "retrieval_picture", "demo_extras"}


def warns_on_import(path: Path) -> bool:
    """Whether the module calls ``warnings.warn`` at import time (its top level): a shim's mark."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue  # their warnings come when they are called, not when the module is imported
        if any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "warn"
               for n in ast.walk(node)):
            return True
    return False


def test_no_deprecated_shim_modules():
    assert not [name for name in NEVER_PUBLISHED if (PACKAGE / name).exists()]
    shims = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py")) if warns_on_import(p)]
    assert not shims, f"modules that warn when imported (deprecated shims): {shims}"


def test_shim_detector_sees_a_shim(tmp_path):
    shim = tmp_path / "old.py"
    shim.write_text('import warnings\nfrom .new import *\nwarnings.warn("old is deprecated", DeprecationWarning)\n')
    quiet = tmp_path / "new.py"
    quiet.write_text('import warnings\n\ndef f():\n    warnings.warn("at call time only")\n')
    assert warns_on_import(shim) and not warns_on_import(quiet)


def long_functions(path: Path) -> list[str]:
    """``name (N lines)`` for each function or method in ``path`` longer than MAX_FUNCTION_LINES."""
    nodes = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    lengths = [(n.name, n.end_lineno - n.lineno + 1) for n in nodes if n.end_lineno is not None]
    return [f"{name} ({lines} lines)" for name, lines in lengths if lines > MAX_FUNCTION_LINES]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_over_80_lines(path):
    assert not long_functions(path)


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
