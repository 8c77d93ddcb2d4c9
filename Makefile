# medsynth: two commands on a fresh machine.
#   make demo   create .venv, install, run the default federation (3 phantom hospitals)
#   make test   create .venv, install with dev extras, lint, type-check, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_OUT ?= medsynth-output/demo

.PHONY: install demo test test-quick lint bench bench-scale bench-secagg bench-prepare bench-quality bench-audit bench-augment bench-segmentation clean

install: $(STAMP)

# torch is pinned to the CPU wheel torch==2.13.0 in pyproject.toml; nothing else is downloaded
# but packages from the registry.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/medsynth simulate --out $(DEMO_OUT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy common client server simulation medsynth

# Two pytest-xdist workers, one test file per worker at a time (a file's fixtures are built once),
# longest files first (tests/conftest.py), torch on one thread per worker: 2 cores kept busy
# without oversubscribing them. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: lint
	$(PYTEST) --durations=15

# the suite without the end-to-end tests marked slow (those start real Flower processes)
test-quick: lint
	$(PYTEST) -m "not slow"

bench: install
	$(BIN)/python -m simulation.bench_dp_step

# medsynth simulate at 5, 10, 20, 50, 100, 500 hospitals, plain then secure aggregation (set-up, first and
# steady round, secure/plain, peak memory); 45 min on 2 cores: BENCH_SCALE_ARGS="--sites 10 20"
# picks fewer (docs/benchmarks.md)
bench-scale: install
	$(BIN)/python -m simulation.bench_scale $(BENCH_SCALE_ARGS)

bench-secagg: install
	$(BIN)/python -m simulation.bench_secagg

bench-prepare: install
	$(BIN)/python -m simulation.bench_prepare

# needs ../shared/data/medmnist/pneumoniamnist.npz; about an hour on 2 CPU cores
bench-quality: install
	$(BIN)/python -m simulation.bench_quality

# medsynth audit, both parts (one-run audit; membership inference on G, D and the synthetic set): phantoms and
# PneumoniaMNIST side by side, 3 seeds; about half an hour on 2 cores (docs/benchmarks.md)
bench-audit: install
	$(BIN)/python -m simulation.bench_audit

# needs ../shared/data/medmnist/pneumoniamnist.npz; federations take ~2.5 min each, three classifiers per arm the rest:
# BENCH_AUGMENT_ARGS="--checkpoints DIR" reuses trained ones (docs/augment.md)
bench-augment: install
	$(BIN)/python -m simulation.bench_augment $(BENCH_AUGMENT_ARGS)

# needs ../shared/data/segmentation/hc18; pair federations at ε = 10, ε = 1 and no DP, 3 seeds (docs/segmentation.md);
# BENCH_SEGMENTATION_ARGS="--epsilons 10,none --seeds 0" for a shorter run
bench-segmentation: install
	$(BIN)/python -m simulation.bench_segmentation $(BENCH_SEGMENTATION_ARGS)

clean:
	rm -rf medsynth-output .pytest_cache .mypy_cache .ruff_cache
