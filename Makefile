# Two commands for a fresh machine: `make demo` and `make test`. Both first run
# tools/setup_env.sh, which builds .venv once and is a no-op afterwards.
PY := .venv/bin/python

.PHONY: setup demo scoring-demo test test-quick test-trained test-trained-rebuild bench bench-e2e bench-pruning gpu-check
setup:
	@tools/setup_env.sh

demo: setup
	@$(PY) examples/serve_demo.py

scoring-demo: setup
	@$(PY) examples/scoring_demo.py

test: setup
	@$(PY) -m pytest

# The tests that start no in-process engine (about two minutes): for a quick loop.
test-quick: setup
	@$(PY) -m pytest -m "not engine"

# The trained pair's quality gates through vLLM (also in `make test`), with their figures.
test-trained: setup
	@$(PY) -m pytest tests/testbed/test_trained_pair.py -s -v

# Train both shipped pairs from their recipes and compare with the shipped weights (a quarter of an hour each).
test-trained-rebuild: setup
	@HIPPO_TEST_REBUILD_TRAINED_PAIR=1 $(PY) -m pytest tests/testbed/test_trained_pair_rebuild.py -s

bench: setup
	@$(PY) benchmarks/bench_scoring.py

bench-e2e: setup
	@$(PY) benchmarks/bench_e2e.py

# PAIR=trained (default) or tiny; the trained pair is built on first use.
PAIR ?= trained
bench-pruning: setup
	@$(PY) benchmarks/bench_pruning_study.py --pair $(PAIR)

gpu-check: setup
	@$(PY) tools/gpu_check.py
