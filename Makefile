# zimage-lite developer entry points.
#   make demo   create/reuse a virtualenv, install, generate an image with the built-in tiny synthetic model
#   make test   install what is missing and run the whole test suite
#   make mutate mutation testing in slices (tools/mutate.py; minutes to half an hour a slice, not in CI):
#               make mutate SLICES="sampling planner" MUTATE_LIMIT=1800
#
# TORCH_SPEC picks the torch wheel. The default pins the CPU build that CI machines have on disk.
# On a CUDA machine use the normal wheel:  make demo TORCH_SPEC=torch
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.zimage-lite-installed
TEST_STAMP := $(VENV)/.zimage-lite-test-installed
DEMO_DIR ?= out/demo
DEMO_PROMPT ?= a lighthouse on a cliff at dusk, oil painting

MUTATE_OUT ?= out/mutate
MUTATE_LIMIT ?= 3600
SLICES ?=

.PHONY: install test demo lint clean-demo mutate

# what the program needs (make demo, make install); the test extra (diffusers, transformers, peft, ruff,
# ...) only for make test / make lint
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(TEST_STAMP)

install: $(STAMP)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

mutate: $(TEST_STAMP)
	$(BIN)/python -m pip install -q mutmut
	$(BIN)/python tools/mutate.py $(SLICES) --out $(MUTATE_OUT) --time-limit $(MUTATE_LIMIT)

lint: $(TEST_STAMP)
	$(BIN)/ruff check zimage_lite tests benchmarks tools
	$(BIN)/ruff format --check zimage_lite tests benchmarks tools

demo: $(STAMP)
	test -d $(DEMO_DIR)/tiny-model || $(BIN)/zimage-lite synthetic $(DEMO_DIR)/tiny-model --size tiny
	$(BIN)/zimage-lite generate "$(DEMO_PROMPT)" --model $(DEMO_DIR)/tiny-model --device cpu \
		--width 256 --height 256 --seed 42 -o $(DEMO_DIR)/demo.png --stats $(DEMO_DIR)/stats.json --force
	$(BIN)/zimage-lite bench --synthetic tiny --device cpu --prompts 2 --steps 4 --width 64 --height 64 \
		--precisions bf16,q8_0,q4_k --cache $(DEMO_DIR)/bench-cache --out $(DEMO_DIR)/bench -q --force
	@echo "image:        $(DEMO_DIR)/demo.png  (random weights: expect colourful noise, not a lighthouse)"
	@echo "timings:      $(DEMO_DIR)/stats.json"
	@echo "bench report: $(DEMO_DIR)/bench/report.md"

clean-demo:
	rm -rf $(DEMO_DIR)
