# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
NATIVE := $(wildcard src/shmkit/_native/*.c src/shmkit/_native/*.h)
STAMP  := $(VENV)/.installed

.PHONY: demo test soak bench build clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Rebuild the C core in place when a C file changed (the editable install points at src/).
build: $(STAMP) $(NATIVE)
	flock .build.lock $(PY) setup.py -q build_ext --inplace

demo: build
	$(VENV)/bin/shmkit demo

test: build
	$(PY) -m pytest -q -m "not soak" tests

soak: build
	$(PY) -m pytest -q -m soak tests

# Peers are optional: each is installed on its own, so one that cannot be had is skipped
# (the benchmark prints a line saying so) instead of failing the rest.
PEERS = $(shell $(PYTHON) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench']))")

bench: build
	@for p in $(PEERS); do $(PY) -m pip install -q "$$p" >/dev/null 2>&1 || echo "benchmark peer $$p could not be installed; it will be skipped"; done
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info src/shmkit/*.so .build.lock
