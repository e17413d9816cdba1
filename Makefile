# Two commands: `make demo` (the main job) and `make test`. Both create .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mmfm demo --out demo_out

PYTEST_ARGS ?=
test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -n logical --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS) tests

bench: $(STAMP)
	mkdir -p out/bench
	for b in scripts/bench_*.py; do \
	  size=; [ $$b = scripts/bench_feature_store.py ] && size="--slides 256"; \
	  $(BIN)/python $$b --json out/bench/$$(basename $$b .py).json $$size || exit 1; done  # 3 GB store, not 25

clean:
	rm -rf $(VENV) demo_out out
