#!/usr/bin/env bash
# The package as a pip user gets it: build the wheel, install it with NO extras into a fresh venv,
# run the README's complete example there (from an empty folder, so the checkout is not imported),
# and each console script's --help. About 1-2 minutes; `make wheel-check` and CI call it.
#
#   bash scripts/check_wheel.sh     # PYTHON=python3: the fresh venv's interpreter; the wheel is built
#                                   # with .venv's pip when .venv exists (make test made it), else PYTHON's
set -euo pipefail
cd "$(dirname "$0")/.."
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }; }  # pip's notes on the local index
ROOT="$PWD"
PYTHON="${PYTHON:-python3}"
BUILD_PY="$PYTHON"
[ -x .venv/bin/python ] && BUILD_PY=.venv/bin/python
WORK="$(mktemp -d /tmp/dino-wheel-check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS

echo "== build the wheel (from a copy of the tree: no stale build/ in the checkout, none left there)"
mkdir -p "$WORK/src"
tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./site \
    --exclude=./runs --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$WORK/src" -xf -
quiet "$BUILD_PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
wheel="$(ls "$WORK"/dist/dino_pytorch-*.whl)"
echo "$(basename "$wheel")"

echo "== install it, no extras, into a fresh venv (torch/torchvision pinned to the tested versions)"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
quiet "$VPY" -m pip install -q "$wheel" torch==2.14.1 torchvision==0.29.1
quiet "$VPY" -m pip check

echo "== the README's complete example"
"$VPY" - "$ROOT/README.md" > "$WORK/example.py" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
m = re.search(r"<!-- complete-example:start -->\s*```python\n(.*?)```\s*<!-- complete-example:end -->", text, re.S)
if not m:
    sys.exit("README.md has no complete-example block")
print(m.group(1))
PY
mkdir -p "$WORK/empty"
(cd "$WORK/empty" && env -u PYTHONPATH "$VPY" "$WORK/example.py")
(cd "$WORK/empty" && env -u PYTHONPATH "$VPY" -c "import dino_pytorch, os; assert '$ROOT' not in dino_pytorch.__file__, dino_pytorch.__file__; print('imported from', os.path.dirname(dino_pytorch.__file__))")

echo "== console scripts"
for script in dino-train dino-eval-knn dino-eval-linear dino-visualize-attention dino-plot-curves; do
    usage="$(cd "$WORK/empty" && env -u PYTHONPATH "$WORK/venv/bin/$script" --help | head -1)"
    case "$usage" in
        "usage: $script "*) echo "$script --help: ok" ;;
        *) echo "$script --help: usage line is '$usage', expected 'usage: $script ...'"; exit 1 ;;
    esac
done
echo "wheel check passed in $((SECONDS - start)) s"
