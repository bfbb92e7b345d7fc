# Two commands do all the set-up (README): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/ekx: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,plot,dev,torchcodec,docs,timm,clip,hf,lmdb,tensorboard,wandb,mlflow]'
	touch $@

.PHONY: install demo test test-fast lint bench docs
install: $(BIN)/ekx

demo: install
	$(BIN)/ekx demo

lint: install
	$(BIN)/ruff check ekx tests bench
	$(BIN)/ruff format --check ekx tests bench
	$(BIN)/mypy

docs: install
	$(BIN)/mkdocs build --strict

# the whole suite on both cores under coverage.py: the 15 slowest tests, the total, and line +
# branch coverage at the end (`make test-fast`: the tests not marked slow, for before a commit)
PYTEST := -m pytest -q -n 2 --dist loadgroup
test: install
	$(BIN)/coverage erase
	$(BIN)/coverage run $(PYTEST) --durations=15; s=$$?; \
	  $(BIN)/coverage combine -q && $(BIN)/python .ci/coverage_summary.py; \
	  exit $$s

test-fast: install
	$(BIN)/python $(PYTEST) -m "not slow"

bench: install
	$(BIN)/python bench/extract_bench.py
	$(BIN)/python bench/heads_bench.py
	$(BIN)/python bench/sweep_bench.py
	$(BIN)/python bench/finetune_bench.py
	$(BIN)/python bench/live_bench.py
