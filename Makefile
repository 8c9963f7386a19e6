# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Both create or refresh .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: an unpinned torch pulls several GB of CUDA packages. The pin is the
# Dockerfile's ARG TORCH_VERSION, so the tests run against the torch the trainer image ships.
TORCH_PIN := torch==$(shell sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-kernels venv test-deps apt-deps cluster-bins lint bench-merge bench-sft bench-operator clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when pyproject.toml or the Dockerfile (the torch pin) changes.
$(VENV)/.installed: pyproject.toml Dockerfile | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[operator,trainer,local]'
	touch $@

# kmock was a test dependency (the retired API server emulator): a venv made before it was dropped
# still has it, and its pytest plugin stops pytest (it needs pytest-asyncio). A no-op otherwise.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[operator,trainer,local,test]'
	$(BIN)/pip uninstall -q -y kmock 2>/dev/null
	touch $@

venv: $(VENV)/.installed

# Debian packages the tests use: a real Prometheus server and promtool; openssl for the test
# control plane's ServiceAccount signing key.
apt-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v openssl >/dev/null || \
	  ( $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus openssl >/dev/null )

# The Kubernetes control plane the tests start (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler), built with Go at the versions in tests/cluster/go.mod, and Kueue's and JobSet's
# controller-managers with their CRDs and webhook manifests at the versions in tests/cluster/kueue/go.mod
# and tests/cluster/jobset/go.mod, into a cache outside the work tree; only what is missing is built
# (~5 + ~3.5 + ~3 min cold), a warm run does nothing.
cluster-bins:
	bash tests/cluster/build.sh
	bash tests/cluster/kueue/build.sh
	bash tests/cluster/jobset/build.sh

test-deps: apt-deps $(VENV)/.installed-test cluster-bins

demo: venv
	$(BIN)/mot demo $(DEMO_ARGS)

# torch picks CPU kernels per machine (ATEN_CPU_CAPABILITY: default, avx2, avx512): the suite runs
# on this CPU's best, then the numerically sensitive tests run again under each other family this
# CPU has, so an assertion that holds on one CI machine only fails here.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
OTHER_KERNELS := $(if $(filter avx2,$(CPU_FLAGS)),default) $(if $(filter avx512f,$(CPU_FLAGS)),avx2)

test: test-deps
	$(BIN)/ruff check operator trainer tests bench
	OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q -p no:cacheprovider --durations=25 $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-kernels

test-kernels: test-deps
	@for kernels in $(OTHER_KERNELS); do \
	  echo "numerically sensitive tests under ATEN_CPU_CAPABILITY=$$kernels"; \
	  ATEN_CPU_CAPABILITY=$$kernels OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q -p no:cacheprovider -m numerics || exit 1; \
	done

lint: test-deps
	$(BIN)/ruff check operator trainer tests bench

clean:
	rm -rf $(VENV) build *.egg-info
