# herd - everything a fresh machine needs comes from here.
#   make test   create .venv if missing, install torch + herd[dev], run the whole suite
#   make demo   the README's main job (today: model sizes, a tiny multimodal checkpoint, a generation with an image)
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.herd-installed

.PHONY: test demo lint bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned in the same pip command as everything else, so no dependency can pull another torch build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_SPEC) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

demo: $(STAMP)
	$(BIN)/herd info --preset llama4-scout
	$(BIN)/herd info --preset llama4-maverick
	$(BIN)/herd init --preset tiny --multimodal --out out/tiny-random
	$(BIN)/herd info --model out/tiny-random
	$(BIN)/herd generate --model out/tiny-random --prompt "What is in this picture?" \
		--image tests/data/images/portrait_h500_w375.jpg --max-new-tokens 48

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_model.py

clean:
	rm -rf $(VENV) out .pytest_cache
