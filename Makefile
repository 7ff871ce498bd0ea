# Fresh-machine entry points: `make demo` and `make test` each create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test venv data clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

test: $(STAMP) $(FMNIST)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# About 5 minutes on 2 CPU cores: k-NN at random init (~1 min), 3 minutes of DINO, k-NN again,
# raw-pixel k-NN; curves, metrics and attention maps land in runs/demo.
demo: $(STAMP) $(FMNIST)
	rm -rf runs/demo
	$(PY) -m dino_pytorch.train --dataset fashion_mnist --arch vit_tiny --patch_size 4 \
	    --vit_depth 4 --vit_embed_dim 96 --drop_path_rate 0 --out_dim 4096 --hidden_dim 512 \
	    --bottleneck_dim 128 --use_bn_in_head true --batch_size_per_gpu 64 --local_crops_number 4 \
	    --local_crops_scale 0.1 0.4 --lr 0.004 --warmup_steps 50 --momentum_teacher 0.99 \
	    --freeze_last_layer 0 --max_steps 400 --time_budget_min 3 --num_workers 1 --log_every 25 \
	    --output_dir runs/demo
	@echo "curves, metrics and attention maps: runs/demo (the 60-minute ConvNet run: docs/results.md)"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
