# Two commands on a fresh machine: `make demo` and `make test`. Everything else is set up on the way.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install redis protos test unit integration demo load clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first (found locally); the pin in pyproject keeps anything from replacing it.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

redis:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server; }

protos: install
	$(BIN)/python scripts/gen_protos.py

test: install redis
	$(BIN)/python -m pytest -q -p no:cacheprovider

unit: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

integration: install redis
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/integration

demo: install redis
	$(BIN)/python scripts/demo.py

# Locust against a running stack (`mmserve up`): CSVs, a plot and a summary in $(OUT).
ADDR     ?= 127.0.0.1:50051
DURATION ?= 60s
RATE     ?= 2
WORKLOAD ?= mixed
OUT      ?= loadtest/out

load: install
	$(BIN)/python loadtest/run.py --addr $(ADDR) --duration $(DURATION) --rate $(RATE) --workload $(WORKLOAD) --out $(OUT)

clean:
	rm -rf $(VENV) .cache
