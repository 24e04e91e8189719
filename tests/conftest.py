"""Shared fixtures: one short smoke training run, trained in-process once per
session (once for all pytest-xdist workers) and read or copied by the tests
that evaluate, quantize, resume or damage it; and one JAX persistent
compilation cache for the whole session.

The cache: most of the suite's time is XLA compiling the smoke model, and
many tests compile the very same program (the same config's init and step,
the CLIs the tests spawn, the two-process workers, the notebook's kernel).
JAX's persistent cache keys an executable by its HLO, compile options and
devices (not by file or line), so the second compile of a program is a file
read. The cache lives in a fresh temporary directory per session (set through
the environment, so subprocesses and pytest-xdist workers share it) and is
removed at the end: every CI run still compiles everything once.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("QTRAIN_TEST_DATA", ROOT / "data" / "kjv"))

_CACHE_ENV = {
    # Every compile, also the sub-second ones: the smoke model's are 0.2-3 s,
    # and a read of the cached executable is ~10x faster than compiling it.
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    # A size limit turns on JAX's file lock around reads and writes, so two
    # xdist workers never read an entry the other is half-way writing.
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30),
}
_made_cache_dir = None


def pytest_configure(config):
  """Points JAX (here, in xdist workers and in subprocesses: all inherit the
  environment) at one compilation cache for the session, unless the caller
  set JAX_COMPILATION_CACHE_DIR. Runs before any test module imports jax."""
  global _made_cache_dir
  del config
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return  # Set by the caller, or by the xdist controller for this worker.
  _made_cache_dir = tempfile.mkdtemp(prefix="qtrain-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _made_cache_dir
  for name, value in _CACHE_ENV.items():
    os.environ.setdefault(name, value)
  if "jax" in sys.modules:  # Imported by a plugin: its flags read the environment already.
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", _made_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_compilation_cache_max_size",
                      int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))


# Seconds per module: the sums of `make test`'s own --durations=0 on a fresh
# clone (2026-11-24; two workers sharing the compilation cache, so a module's
# figure includes the compiles it was the first to need; only the order
# matters). `make test` hands whole modules to its two workers
# (--dist loadfile) in collection order (--no-loadscope-reorder), and
# pytest_collection_modifyitems puts the longest first, so the last modules
# handed out are short and both workers finish together. xdist's own order
# (most tests first) handed out the long few-test modules (test_docs_commands,
# test_prepare, test_warm_start, test_notebook) last, while the other worker
# idled. A module not listed counts as DEFAULT_MODULE_SECONDS; a wrong number
# costs balance, never a test.
MODULE_SECONDS = {
    "test_int4_mosaic": 25, "test_rotation": 164, "test_pipeline": 130, "test_parallel": 118, "test_train": 115,
    "test_kernels": 97, "test_fused_projections": 75, "test_multihost": 73,
    "test_osp_layers": 73, "test_steps": 71, "test_ptq": 68, "test_zo": 65,
    "test_exchange_fsdp": 60, "test_int4_export": 54, "test_layers": 51,
    "test_quant_numerics": 50, "test_sft": 47, "test_optim": 46, "test_ptq_hf": 45,
    "test_memopt": 41, "test_hf_qwen2": 41, "test_context_parallel": 39, "test_seams": 38,
    "test_generate": 37, "test_grad_exchange": 37, "test_int4_gemv": 37,
    "test_chunked_loss": 37, "test_remesh": 34, "test_sltrain_memory": 33,
    "test_convert_cli": 32, "test_roste": 30, "test_ring_attention": 30, "test_kurtosis": 30,
    "test_warm_start": 28, "test_cast_transpose": 28, "test_delayed_scaling": 26,
    "test_int8_step": 24, "test_muon": 23, "test_quant_dot": 21, "test_config_optim": 19,
    "test_docs_commands": 19, "test_grad_accum": 18, "test_attention_remat": 17,
    "test_notebook": 15, "test_prepare": 14, "test_optim_recipes": 12, "test_plot": 12,
    "test_zo_memory": 11, "test_convert": 11, "test_cli": 9, "test_sweep": 7,
    "test_configs_scale": 7, "test_data_shards": 4, "test_data": 2, "test_launch_tpu": 2,
    "test_slurm": 0, "test_corpus_sources": 0, "test_attention_gpu": 0,
}
DEFAULT_MODULE_SECONDS = 30


def pytest_collection_modifyitems(config, items):
  """Modules longest first (MODULE_SECONDS), each module's tests in file
  order. Deterministic, so every xdist worker collects the same order."""
  del config
  seconds = lambda item: MODULE_SECONDS.get(item.path.stem, DEFAULT_MODULE_SECONDS)
  items.sort(key=lambda item: -seconds(item))  # Stable: file order within a module.


def pytest_unconfigure(config):
  del config
  if _made_cache_dir is not None:
    shutil.rmtree(_made_cache_dir, ignore_errors=True)


def smoke_config(**train):
  """The smoke config on the test data: 4 steps, checkpoints at 2 and 4, a
  fixed cosine horizon (8) so resumed runs may raise train.steps."""
  from configs import default  # pylint: disable=g-import-not-at-top
  cfg = default.get_config("smoke")
  cfg.data.dir = str(DATA)
  cfg.train.update(steps=4, checkpoint_every=2, eval_every=100, log_every=1, sample_tokens=0)
  cfg.train.update(**train)
  cfg.optim.decay_steps = 8
  return cfg


def shared_dir(tmp_path_factory, name: str, build) -> pathlib.Path:
  """A directory ``build(path)`` fills, made once per test session.

  pytest-xdist workers are separate processes, so a session fixture runs
  once in each. Under xdist the first worker to ask builds the directory
  (in a private temporary path, then renamed into place: a failed build
  leaves nothing half-made) while holding an exclusive lock in the temporary
  directory all workers of this session share; the others wait on the lock
  and read what it built. Callers must not write into the result: copy it.
  """
  if os.environ.get("PYTEST_XDIST_WORKER") is None:
    path = tmp_path_factory.mktemp(name) / name
    build(path)
    return path
  shared = tmp_path_factory.getbasetemp().parent  # pytest-<n>/, above every popen-gw<i>/.
  path = shared / name
  with open(shared / f"{name}.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    if not path.exists():
      private = tmp_path_factory.mktemp(name) / name
      build(private)
      os.replace(private, path)
  return path


def _train_smoke_run(workdir: pathlib.Path) -> None:
  from qtrain.train.loop import run  # pylint: disable=g-import-not-at-top
  run(smoke_config(), str(workdir))


@pytest.fixture(scope="session")
def smoke_run_dir(tmp_path_factory) -> pathlib.Path:
  """The smoke run (4 steps, checkpoints at 2 and 4), trained once for all
  workers of the session. Read-only: tests that write take ``smoke_run``."""
  return shared_dir(tmp_path_factory, "smoke_run", _train_smoke_run)


def _train_telemetry_runs(root: pathlib.Path) -> None:
  from qtrain.train.loop import run  # pylint: disable=g-import-not-at-top
  root.mkdir(parents=True)
  for seed, name in enumerate(TELEMETRY_RUNS):
    cfg = smoke_config(log_every=100)
    cfg.seed = seed
    cfg.telemetry.every = 2
    cfg.telemetry.matmuls = "decoder/layers/mlp/down_proj"  # The one the notebook plots.
    run(cfg, str(root / name))


TELEMETRY_RUNS = ("a", "b")


@pytest.fixture(scope="session")
def telemetry_runs_dir(tmp_path_factory) -> pathlib.Path:
  """Two smoke runs (seeds 0 and 1, subdirectories a and b) with telemetry
  every 2 steps: measured at steps 1, 2 and 4, no other train rows
  (log_every=100), checkpoints at 2 and 4. Trained once for all workers of the
  session; read-only (tests/test_kurtosis.py reads a, tests/test_notebook.py
  copies both)."""
  return shared_dir(tmp_path_factory, "telemetry_runs", _train_telemetry_runs)


@pytest.fixture
def smoke_run(smoke_run_dir, tmp_path) -> pathlib.Path:
  """A private copy of the session's smoke run."""
  copy = tmp_path / "run"
  shutil.copytree(smoke_run_dir, copy)
  return copy
