"""A run's first params: learned quantizer steps from real data and the loaded
weights, and init_from an unquantized run into an LSQ config (which failed on
missing step keys before). References: LSQ's initialisation formula on the
loaded kernels, and the source run's own checkpoint."""

import numpy as np

from configs import default
from qtrain.optim import build_optimizer
from qtrain.parallel import Layout
from qtrain.train import checkpoint
from qtrain.train.build import build_model
from qtrain.train.loop import run
from qtrain.train.state import abstract_params, abstract_state, init_state, params_target
from qtrain.train.warm_start import initial_params


def _smoke(steps=2):
  c = default.get_config("smoke")
  c.train.update(steps=steps, checkpoint_every=steps, eval_every=steps, sample_tokens=0,
                 log_every=1)
  c.optim.warmup_steps = 1
  return c


def _lsq(c):
  c = c.copy_and_resolve_references()
  q = default.get_config("smoke,w4a4").quant
  q.rules.linears.weight.update(calibration="lsq", estimator="lsq")
  q.rules.linears.act.update(calibration="lsq_plus", estimator="lsq", granularity="tensor")
  c.quant = q
  return c


def _source_params(workdir):
  """The source run's params, restored on their own (its model, its shardings)."""
  model, layout = build_model(_smoke()), Layout.from_config(_smoke())
  mesh = layout.mesh
  with layout:
    return checkpoint.restore_params(workdir, params_target(model, mesh, 64))


def test_init_from_unquantized_run_into_lsq_config(smoke_run_dir, tmp_path):
  src = str(smoke_run_dir)  # The session's unquantized smoke run (tests/conftest.py), read only.
  cfg = _lsq(_smoke(2))
  cfg.train.init_from = src
  model = build_model(cfg)
  layout = Layout.from_config(cfg)
  mesh = layout.mesh
  with layout:
    tx = build_optimizer(cfg, abstract_params(model, cfg.data.seq_len))
    state = init_state(model, tx, mesh, cfg.seed, cfg.data.seq_len)
    abstract = abstract_state(model, tx, mesh, cfg.data.seq_len)
    params = initial_params(cfg, model, mesh, state.params, abstract.params)
  down = params["decoder"]["layers"]["mlp"]["down_proj"]
  src_params, _ = _source_params(src)
  kernel = np.asarray(src_params["decoder"]["layers"]["mlp"]["down_proj"]["kernel"], np.float64)
  np.testing.assert_array_equal(down["kernel"], kernel)  # The loaded weights.
  # LSQ init s0 = 2 mean|w| / sqrt(Q_P) per output channel of each layer, Q_P = 7.
  want = 2 * np.abs(kernel).mean(axis=1, keepdims=True) / np.sqrt(7)
  np.testing.assert_allclose(down["dot_general"]["weight_step"], want, rtol=1e-5)
  # Activation steps came from real tokens, not the placeholder zeros of model.init.
  assert not np.allclose(down["dot_general"]["act_step"],
                         state.params["decoder"]["layers"]["mlp"]["down_proj"]["dot_general"][
                             "act_step"])
  summary = run(cfg, str(tmp_path / "qat"))  # End to end: trains from the source's weights.
  assert np.isfinite(summary["final_ppl"])
