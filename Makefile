# Two commands on a fresh machine: `make train` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA := data/kjv
RUN ?= runs/default
CONFIG ?= configs/default.py
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: install data train test clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[data,quant,test]'
	touch $@

data: $(DATA)/meta.json

$(DATA)/meta.json: $(STAMP)
	$(BIN)/python -m qtrain.data.prepare --task=kjv --out=$(DATA)

train: data
	XLA_FLAGS= $(BIN)/python -m qtrain.train --config=$(CONFIG) --workdir=$(RUN)

test: data
	$(BIN)/python -m pytest -q -ra tests

clean:
	rm -rf $(VENV) data runs
