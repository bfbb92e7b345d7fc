# Two commands do all the set-up (README): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/ekx: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,plot]'
	touch $@

.PHONY: install demo test bench
install: $(BIN)/ekx

demo: install
	$(BIN)/ekx demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/extract_bench.py
	$(BIN)/python bench/heads_bench.py
	$(BIN)/python bench/sweep_bench.py
	$(BIN)/python bench/finetune_bench.py
	$(BIN)/python bench/live_bench.py
