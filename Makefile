# lcpaq: the README's two commands. Both create .venv when missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lcpaq-installed
export CUDA_HOME ?= /usr/local/cuda

.PHONY: demo test venv lint bench clean

KERNEL_SRCS := $(wildcard kernels/csrc/*.cpp kernels/csrc/*/*.cpp kernels/csrc/*/*.h kernels/csrc/*/*.cu kernels/csrc/*/*.cuh)

$(STAMP): pyproject.toml requirements.txt Makefile setup.py $(KERNEL_SRCS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24" "setuptools>=70.1" wheel
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q -e . --no-build-isolation
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lcpaq demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(BIN)/ruff check lcpaq tests benchmarks

clean:
	rm -rf build *.egg-info lcpaq/_C*.so
