# finetune-recipes. The two commands a fresh machine needs:
#   make repro   # create .venv, install from the lock, run the whole pipeline (`dvc repro`) on the quickstart
#   make test    # ruff, then the test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
LOCK ?= requirements/cpu.lock
# where pip finds the lock's CPU torch build (torch==X+cpu: PyPI does not serve it): a local wheel folder if
# there is one, else PyTorch's CPU index unless pip is already pointed elsewhere (PIP_FIND_LINKS, as in the image
# build); TORCH_INDEX= (empty) turns the index off. --require-hashes checks the wheel either way.
TORCH_WHEELS ?= /opt/wheels
TORCH_PIN := $(shell sed -n 's/^torch==\([^ ]*\).*/\1/p' $(LOCK) /dev/null)
TORCH_INDEX ?= $(if $(findstring +cpu,$(TORCH_PIN)),$(if $(wildcard $(TORCH_WHEELS))$(PIP_FIND_LINKS),,https://download.pytorch.org/whl/cpu))
PIP_SOURCES := $(if $(wildcard $(TORCH_WHEELS)),--find-links $(TORCH_WHEELS)) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
NO_TORCH = error: no wheel for torch==$(TORCH_PIN) (the CPU build the lock pins; PyPI does not serve it): set TORCH_WHEELS=<folder holding it> or TORCH_INDEX=https://download.pytorch.org/whl/cpu
# PROJECT_INSTALL empty: the locked stack only (the image installs the project in a later, small layer)
PROJECT_INSTALL ?= -e .
STAMP := $(VENV)/.installed
ifdef FINETUNE_VENV  # inside the image: the venv is baked in, nothing to install
VENV := $(FINETUNE_VENV)
BIN := $(VENV)/bin
STAMP :=
endif
# llama.cpp builds for AVX2-class x86-64, not -march=native: the same kernels on every machine
# (reproducible GGUF checks), and no AMX code paths (they crash in sandboxes that do not enable AMX).
# GGML_CUDA=on (the CUDA image): its CUDA backend too, for A100 (80), A10/3090 (86), L4/4090 (89), H100/H200 (90)
GGML_CUDA ?= off
CUDA_ARCHITECTURES ?= 80;86;89;90
LLAMA_CUDA_ARGS := $(if $(filter on ON 1,$(GGML_CUDA)),-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHITECTURES))
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON $(LLAMA_CUDA_ARGS)
LLAMA_CPP_VERSION := 0.3.36

.PHONY: install repro data eval verify chat serve lint test test-fast lock validate clean help test-image
help:
	@sed -n '1,4p' Makefile

$(VENV)/.installed: $(LOCK) requirements/pip.txt requirements/models.txt requirements/lint.txt requirements/llama-cpp-src.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r requirements/pip.txt
	@echo "installing the lock (llama-cpp-python builds from source the first time: ~7 min on 2 cores)"
	$(BIN)/pip install -q --require-hashes --no-deps $(PIP_SOURCES) -r $(LOCK) 2>$(VENV)/pip-lock.log \
	  || { if [[ -n '$(findstring +cpu,$(TORCH_PIN))' ]] && grep -q 'for torch==' $(VENV)/pip-lock.log; then echo '$(NO_TORCH) (pip log: $(VENV)/pip-lock.log)' >&2; \
	       else cat $(VENV)/pip-lock.log >&2; fi; exit 2; }
	@# pip reuses a CPU wheel it built before (its cache does not key on CMAKE_ARGS): rebuild if CUDA is missing
	if [ -n "$(LLAMA_CUDA_ARGS)" ] && ! ls $$($(BIN)/python -c "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))")/lib/libggml-cuda* >/dev/null 2>&1; then \
	  $(BIN)/pip install -q --require-hashes --no-deps --no-cache-dir --force-reinstall -r requirements/llama-cpp-src.txt; fi
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements/models.txt
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements/lint.txt
	$(if $(PROJECT_INSTALL),$(BIN)/pip install -q --no-deps --no-build-isolation $(PROJECT_INSTALL))
	rm -rf $(VENV)/llama.cpp $(VENV)/sdist && mkdir -p $(VENV)/llama.cpp
	$(BIN)/pip download -q --no-deps --no-binary llama-cpp-python --require-hashes -r requirements/llama-cpp-src.txt -d $(VENV)/sdist
	tar xzf $(VENV)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(VENV)/llama.cpp --strip-components=3 \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/conversion \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/gguf-py
	rm -rf $(VENV)/sdist
	touch $(VENV)/.installed

install: $(STAMP)

data: install  ## the quickstart's generated data; data.dvc pins its hash
	$(BIN)/python -m finetune generate-data --out data/quickstart

repro: data
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

eval: install  ## benchmark table across recipes and experiments -> eval/report.md + eval/report.png
	$(BIN)/python -m finetune report

# this workspace's metrics vs the published ones, metric by metric (tolerances.yaml across hardware)
REV ?= HEAD
verify: install  ## REV = the git rev or DVC experiment holding the published metrics (default: HEAD, the committed ones)
	$(BIN)/python -m finetune verify --rev $(REV)

# talk to the result: MODEL = adapter | merged | base | gguf[:<type>] | a path (see docs/using-the-result.md)
MODEL ?= merged
HOST ?= 127.0.0.1
PORT ?= 8000
chat: install  ## interactive chat with streamed tokens
	$(BIN)/python -m finetune chat --model $(MODEL)

serve: install  ## OpenAI-compatible endpoint on $(HOST):$(PORT) (loopback; --allow-remote to widen)
	$(BIN)/python -m finetune serve --model $(MODEL) --host $(HOST) --port $(PORT)

# ruff over every tracked Python file (config: pyproject.toml [tool.ruff]); a finding fails the target before pytest
lint: install
	$(BIN)/ruff check

# pytest-xdist: one worker per core up to 4 (each loads torch; more would trade memory for little); whole files per
# worker, so a module's fixture (a trained tiny project) is built once. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

validate: install
	$(BIN)/python -m finetune validate quickstart llama2-guanaco codellama-evol-instruct llama2-python-code distilbert-imdb llama3-alpaca

lock:  ## regenerate both hash locks from pyproject.toml (uv is in the test extra)
	uv pip compile pyproject.toml --extra test --python-version 3.11 --generate-hashes \
	  $(PIP_SOURCES) -o requirements/cpu.lock
	cp requirements/cpu.lock requirements/cuda.lock  # CPU pins as uv's preferences: same versions but torch's build
	uv pip compile pyproject.toml --extra gpu --extra test --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --generate-hashes --no-emit-find-links -o requirements/cuda.lock

test-image: install  ## build the CPU image with podman (base from debootstrap) and run the quickstart in it
	bash docker/test-image.sh

clean:
	rm -rf outputs metrics dvclive
