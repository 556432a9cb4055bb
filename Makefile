# The two commands of the README's quick start. Both set everything up first.
.PHONY: demo test test-all check-wheel bench lint setup

setup:
	bash scripts/setup.sh

# Compile the bundled example for this machine, run it, verify it against numpy, print latency.
demo: setup
	bash scripts/demo.sh

# Everything CI runs: lint, the installed wheel (built, installed non-editable into a fresh venv,
# run from outside the repo) and the test suite (slow cases excluded; `make test-all` runs them).
test: setup
	.venv/bin/ruff check .
	bash scripts/check-wheel.sh
	.venv/bin/python -m pytest -q

# Only the installed-wheel check of `make test`.
check-wheel: setup
	bash scripts/check-wheel.sh

test-all: setup
	.venv/bin/python -m pytest -q -m ""

bench: setup
	.venv/bin/python benchmarks/bench_mixtral_block.py
