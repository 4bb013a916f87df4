# SplitLoRA: `make demo` and `make test` work on a fresh machine, offline once the packages are installed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= runs/demo
DEMO_PORT ?= 50051
export SPLITLORA_HOME ?= $(CURDIR)/.splitlora-home

.PHONY: venv demo test bench protos check-protos check-containers clean

$(BIN)/splitlora-server: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull gigabytes of CUDA packages
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[test,bench,eval]"
	touch $@

venv: $(BIN)/splitlora-server

demo: venv
	$(BIN)/python scripts/demo.py --output $(DEMO_DIR) --port $(DEMO_PORT)

test: venv
	$(BIN)/python -m pytest -q

# every benchmark at full size (about 40 minutes on 2 CPU cores before `generate`); results and plots under BENCH_OUT
BENCH_OUT ?= runs/bench
bench: venv
	$(BIN)/splitlora-bench all --out $(BENCH_OUT)

# both images built and the compose demo run for real with podman (as root; installs podman from Debian's
# packages; 15 to 30 minutes on 2 cores); not part of `make test`. See docs/deploy.md.
check-containers: venv
	bash scripts/check_containers.sh

protos: venv
	$(BIN)/python scripts/gen_protos.py

check-protos: venv
	$(BIN)/python scripts/gen_protos.py --check

clean:
	rm -rf runs .pytest_cache
