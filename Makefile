# shardtune: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel here; on a CUDA machine the same pin installs the CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
TINY_MODEL := build/tiny-sd3
SAMPLE_DATA := build/sample-data
ARGS ?=

.PHONY: help venv tiny-model sample-data precompute train merge demo test bench gpu-check clean

help:
	@echo "make demo        set up, build the tiny model + sample data, run precompute -> train -> merge"
	@echo "make test        run the test suite"
	@echo "make precompute|train|merge [CONFIG=file.yaml] [ARGS='key=value ...']"
	@echo "make bench       benchmarks that fit this machine -> one table + bench/results-<device>-<date>.json"
	@echo "make gpu-check   on a CUDA GPU, ~8 min: the tiny pipeline on the GPU, measured vs modelled memory (ARGS=--dry-run: the plan)"
	@echo "make tiny-model | sample-data | clean"

# pip byte-compiles what it installs (about 40 s of the install here). Skipping that would not pay: this
# machine and CI set PYTHONDONTWRITEBYTECODE=1, so every process would compile every module it imports.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

$(TINY_MODEL)/model_index.json: $(STAMP) precompute/tiny.py
	$(PY) -m precompute.tiny model $(TINY_MODEL)

$(SAMPLE_DATA)/.complete: $(STAMP) precompute/tiny.py
	$(PY) -m precompute.tiny data $(SAMPLE_DATA)
	touch $@

tiny-model: $(TINY_MODEL)/model_index.json
sample-data: $(SAMPLE_DATA)/.complete

# With no CONFIG each stage runs on the built-in tiny model and reads the previous stage's output.
TINY_DEPS = $(if $(CONFIG),,tiny-model sample-data)
# The tiny runs replace their own build/ outputs; never a folder the user named in ARGS.
REPLACE_TINY = $(if $(CONFIG)$(findstring out.dir,$(ARGS)),,out.overwrite=true)

precompute: $(STAMP) $(TINY_DEPS)
	$(PY) -m precompute --config $(or $(CONFIG),configs/tiny/precompute.yaml) $(REPLACE_TINY) $(ARGS)

train: $(STAMP) $(TINY_DEPS)
	$(PY) -m train --config $(or $(CONFIG),configs/tiny/train.yaml) $(REPLACE_TINY) $(ARGS)

merge: $(STAMP) $(TINY_DEPS)
	$(PY) -m merge --config $(or $(CONFIG),configs/tiny/merge.yaml) $(REPLACE_TINY) $(ARGS)

demo: $(STAMP)
	$(MAKE) --no-print-directory tiny-model sample-data
	$(MAKE) --no-print-directory precompute train merge CONFIG= ARGS=
	@echo
	@echo "demo finished:"
	@echo "  tiny SD3 model      $(TINY_MODEL)/"
	@echo "  sample dataset      $(SAMPLE_DATA)/"
	@echo "  shard set           build/shards/   (python -m shards inspect build/shards)"
	@echo "  LoRA                build/train/pytorch_lora_weights.safetensors"
	@echo "  loss curves         build/train/loss.png, build/train/loss_by_sigma.png   (per step: build/train/metrics.jsonl)"
	@echo "  validation images   build/train/samples/"
	@echo "  merged pipeline     build/merged/   (StableDiffusion3Pipeline.from_pretrained)"

# One worker per core; a file's tests stay on one worker (they share module state and session fixtures).
test: $(STAMP)
	$(PY) -m pytest tests -n auto --dist loadfile

# The train and precompute rows need a CUDA GPU (ARGS=--quick runs tiny versions anywhere); stream and merge run on the CPU.
bench: $(STAMP)
	$(PY) -m bench $(ARGS)

# The first session on a GPU: every CUDA path and the memory figures, one JSON and one table.
gpu-check: $(STAMP)
	$(PY) -m bench.gpu_check $(ARGS)

clean:
	rm -rf build
