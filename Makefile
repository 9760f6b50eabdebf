.PHONY: run test lint format bench bench-quick

run:  ## set up and run web + workers + beat (and Redis if none is running)
	@bash scripts/run.sh

test:  ## set up and run the whole test suite
	@bash scripts/test.sh $(ARGS)

bench:  ## set up (as `make test`) and run every benchmark; writes bench/results/tmp/latest.{json,md} (ARGS=--commit-results: bench/results/, committed)
	@bash scripts/bench.sh $(ARGS)

bench-quick:  ## the short benchmark (< 3 minutes on 2 cores)
	@bash scripts/bench.sh --quick $(ARGS)

lint:  ## what CI checks besides the tests
	@bash -c 'source scripts/lib.sh && ensure_venv && cd "$$ROOT" && \
	  .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy pipelines'

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .
