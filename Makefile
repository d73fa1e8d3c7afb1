# The two commands a new user needs: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast fuzz lint format bench clean soak

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m load_tests demo --out reports/demo

# Ten minutes of steady load, watching the router's RSS, FDs, tasks and index for leaks.
SOAK_DURATION ?= 600
SOAK_RATE ?= 20
soak: $(STAMP)
	$(BIN)/python -m load_tests soak --duration $(SOAK_DURATION) --rate $(SOAK_RATE) --out reports/soak

# Router overhead: direct vs prefix-router (1 and 2 processes) vs a bare aiohttp proxy vs
# sglang-router, instant workers, wrk at 1 and 64 connections (docs/load-tests.md).
bench: $(STAMP)
	$(BIN)/python -m load_tests bench --out reports/bench

lint: $(STAMP)
	$(BIN)/ruff check router worker load_tests tests
	$(BIN)/ruff format --check router worker load_tests tests
	$(BIN)/mypy --strict router worker

format: $(STAMP)
	$(BIN)/ruff format router worker load_tests tests
	$(BIN)/ruff check --fix router worker load_tests tests

# Everything, the real-vLLM tier included (it builds a cached vLLM CPU venv on first use).
test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

# The same without real vLLM: for quick iterations.
test-fast: lint
	$(BIN)/pytest -m "not vllm" $(PYTEST_ARGS)

# The fuzzers (tests/fuzz) with many more examples than in `make test`.
FUZZ_EXAMPLES ?= 500
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest tests/fuzz -p no:cacheprovider --timeout 1800 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) reports .mypy_cache .ruff_cache .pytest_cache .hypothesis
