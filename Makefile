# Two commands do all the set-up (README): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/ekx: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,plot,dev,torchcodec,docs,timm,clip,hf,lmdb]'
	touch $@

.PHONY: install demo test lint bench docs
install: $(BIN)/ekx

demo: install
	$(BIN)/ekx demo

lint: install
	$(BIN)/ruff check ekx tests bench
	$(BIN)/ruff format --check ekx tests bench
	$(BIN)/mypy

docs: install
	$(BIN)/mkdocs build --strict

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/extract_bench.py
	$(BIN)/python bench/heads_bench.py
	$(BIN)/python bench/sweep_bench.py
	$(BIN)/python bench/finetune_bench.py
	$(BIN)/python bench/live_bench.py
