# Fresh-machine entry points: `make demo` and `make test` each create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
# The lint gate's tools, pinned (the versions `make lint` was tested with); the stamp names them,
# so changing a pin reinstalls.
MYPY_VERSION := 2.4.1
RUFF_VERSION := 0.17.6
LINT_STAMP   := $(VENV)/.installed-lint-mypy$(MYPY_VERSION)-ruff$(RUFF_VERSION)
# The docs extra (pinned in setup.py); reinstalled when setup.py changes.
DOCS_STAMP   := $(VENV)/.installed-docs
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-slow test-avx2 venv data clean lint docs wheel-check

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

# The suite in two steps on 2 workers: `make test`, the default (every test not marked slow), then
# `make test-slow` (multi-process runs, training runs, soaks). worksteal: an idle worker takes
# queued tests from the busy one (the default `load` mode queued whole slow files on one worker).
PYTEST := HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist worksteal
test: $(STAMP) $(FMNIST)
	$(PYTEST) -m "not slow"

test-slow: $(STAMP) $(FMNIST)
	$(PYTEST) -m slow

# The tests whose numbers depend on the CPU's kernels: golden files, parity with the official code,
# precision, bit-identical resumes. `make test-avx2` runs them again on the kernels of a CPU with
# AVX2 only and no native bf16 (what most developers have): ATen's AVX2 build, oneDNN and MKL
# capped at AVX2. On an AVX-512 machine, this is the only run that sees those kernels; one file:
# `make test-avx2 NUMERICS_TESTS=tests/test_vit.py`. torch.compile gets its own cache: Inductor's
# graph caches are keyed without the CPU capability, and a graph compiled under one capability
# computed wrong numbers (zero gradients) when loaded under the other (torch 2.14.1).
NUMERICS_TESTS := \
	tests/test_augment_golden.py tests/test_augment_per_image.py tests/test_augment_batched.py \
	tests/test_loss.py tests/test_cross_entropy.py tests/test_loss_hazards.py tests/test_dino_logit_copies.py \
	tests/test_ibot_loss.py tests/test_masking.py tests/test_dinov2_vit.py tests/test_dino_ibot.py \
	tests/test_vit.py tests/test_head.py tests/test_attention.py tests/test_dino_training.py tests/test_schedules.py \
	tests/test_precision.py tests/test_train.py tests/test_checkpoint.py \
	tests/test_crash_safety.py::test_two_random_kills_resume_bitwise
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/$(VENV)/torchinductor-avx2
test-avx2: $(STAMP) $(FMNIST)
	$(AVX2) $(PYTEST) $(NUMERICS_TESTS)

$(LINT_STAMP): $(STAMP)
	$(PY) -m pip install -q 'mypy==$(MYPY_VERSION)' 'ruff==$(RUFF_VERSION)'
	touch $(LINT_STAMP)

# Types and lint as gates (settings in pyproject.toml): both run, and both must report nothing.
lint: $(LINT_STAMP)
	@status=0; \
	echo "$(PY) -m mypy dino_pytorch"; $(PY) -m mypy dino_pytorch || status=1; \
	echo "$(PY) -m ruff check dino_pytorch tests benchmarks examples $(wildcard hubconf.py)"; \
	$(PY) -m ruff check dino_pytorch tests benchmarks examples $(wildcard hubconf.py) || status=1; \
	exit $$status

# About 5 minutes on 2 CPU cores (docs/results.md, "The demo"): k-NN at random init, 800 DINO steps
# of a small ConvNet with a k-NN point every 100 steps, then the final k-NN, raw pixels and the
# pictures (curves.png, retrieval.png) in runs/demo. `make demo SEED=1` for another seed.
SEED ?= 0
demo: $(STAMP) $(FMNIST)
	rm -rf runs/demo
	$(PY) -m dino_pytorch.train --dataset fashion_mnist --arch convnet --width 16 --pool 2 \
	    --out_dim 4096 --hidden_dim 512 --bottleneck_dim 128 --use_bn_in_head true \
	    --batch_size_per_gpu 128 --local_crops_number 6 --local_crops_scale 0.1 0.4 \
	    --lr 0.004 --warmup_steps 50 --momentum_teacher 0.99 --freeze_last_layer 0 \
	    --precision auto --channels_last --max_steps 800 --time_budget_min 4.5 \
	    --knn_every 100 --knn_train_subset 10000 --knn_test_subset 2000 \
	    --seed $(SEED) --num_workers 1 --log_every 50 --output_dir runs/demo
	@echo "runs/demo: curves.png (loss, k-NN, collapse monitor), retrieval.png, metrics.jsonl, summary.json"

$(DOCS_STAMP): $(STAMP) setup.py
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

# The documentation site (mkdocs.yml; API reference from the docstrings) into site/; --strict: any
# warning (a broken link, a docstring mkdocstrings cannot parse) fails the build.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

# The wheel as a pip user gets it: built, installed without extras in a fresh venv, the README's
# complete example and every console script's --help run there (about 2 minutes).
wheel-check:
	bash scripts/check_wheel.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
