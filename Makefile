# The two commands of the README's quick start. Both set everything up first.
.PHONY: demo test bench lint setup

setup:
	bash scripts/setup.sh

# Compile the bundled example for this machine, run it, verify it against numpy, print latency.
demo: setup
	bash scripts/demo.sh

# Everything CI runs: lint and the test suite (slow cases excluded; `make test-all` runs them).
test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q

test-all: setup
	.venv/bin/python -m pytest -q -m ""

bench: setup
	.venv/bin/python benchmarks/bench_mixtral_block.py
