# Two commands on a fresh machine: `make train` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TRAIN_STAMP := $(VENV)/.installed-train
TEST_STAMP := $(VENV)/.installed-test
DATA := data/kjv
RUN ?= runs/default
CONFIG ?= configs/default.py
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: install data train test clean corpus

install: $(TEST_STAMP)

# uv installs the 4 GB of wheels (TensorFlow comes with seqio) in about a
# minute where pip took several. torch is the exception: pip takes the CPU
# wheel that lies on disk, uv would download a CUDA build.
$(TRAIN_STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[data,quant]'
	touch $@

$(TEST_STAMP): $(TRAIN_STAMP)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[data,quant,test]'
	touch $@

data: $(DATA)/meta.json

$(DATA)/meta.json: $(TRAIN_STAMP)
	$(BIN)/python -m qtrain.data.prepare --task=kjv --out=$(DATA)

# debian_en (qtrain/data/debian.py): real English from ~40 Debian
# documentation and dictionary packages (52.7M tokens), with a 32k vocabulary.
# Not part of `make train`. Needs the packages installed (apt-get, as root,
# ~3 GB); when they are not, `--check` prints the apt-get command naming all
# of them and fails. 7-12 min on two busy cores. CORPUS_ARGS=--force rebuilds.
CORPUS := data/debian_en
CORPUS_ARGS ?=

corpus: $(TRAIN_STAMP)
	$(BIN)/python -m qtrain.data.debian --check
	$(BIN)/python -m qtrain.data.prepare --task=debian_en --out=$(CORPUS) --vocab_size=32000 $(CORPUS_ARGS)

train: data
	XLA_FLAGS= $(BIN)/python -m qtrain.train --config=$(CONFIG) --workdir=$(RUN)

# Two pytest-xdist workers: XLA compiles (most of the suite's time) run on one
# thread each, so two workers keep both of CI's cores busy. Each worker has
# its own 8 fake devices (XLA_FLAGS); tests/conftest.py gives them one shared
# compilation cache. --dist loadfile keeps a module on one worker, so its
# module-scoped fixtures (a compiled model, a trained run) are built once.
# --no-loadscope-reorder hands modules out in collection order, which
# tests/conftest.py sorts longest first (xdist's own order, most tests first,
# left long few-test modules for last while one worker idled).
TEST_WORKERS ?= 2

test: data $(TEST_STAMP)
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf $(VENV) data  # runs/ holds trained models: never cleaned

# A real one-node SLURM on 127.0.0.1 (scripts/slurm/local_cluster.sh): a
# 2-task job of the smoke config through scripts/slurm/launch.py, then one
# process starting from its checkpoint. Installs Debian's slurm-wlm and munge
# with apt-get when missing (root only; otherwise it names them and exits 3).
# Needs `make data` (and the venv) first; ~2-3 min on two cores.
# Every smoke-sized command of the docs (those writing under $TMP), run as
# written after the quickstart's smoke run (tests/test_docs_commands.py);
# minutes, so apart from `make test`, whose time budget it would take.
.PHONY: test-docs
test-docs: data $(TEST_STAMP)
	QTRAIN_DOCS_SMOKE=1 $(BIN)/python -m pytest -q -p no:xdist tests/test_docs_commands.py -k every_smoke_sized -s

.PHONY: test-slurm
test-slurm: data $(TRAIN_STAMP)
	PY=$(BIN)/python DATA=$(DATA) scripts/slurm/local_cluster.sh
