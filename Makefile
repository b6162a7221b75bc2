# Two commands for a fresh machine: `make demo` and `make test`. Both first run
# tools/setup_env.sh, which builds .venv once and is a no-op afterwards.
PY := .venv/bin/python

.PHONY: setup demo test bench
setup:
	@tools/setup_env.sh

demo: setup
	@$(PY) examples/scoring_demo.py

test: setup
	@$(PY) -m pytest

bench: setup
	@$(PY) benchmarks/bench_scoring.py
