"""Activation kurtosis (qtrain.analysis): OSP's excess kurtosis against SciPy
and a float64 NumPy transcription of the paper's formula; the telemetry step
against the plain step (same loss, same params) and against kurtosis of
activations captured independently (flax ``capture_intermediates``); the
unmeasured step compiles to what it did without the provider; the loop logs
per-layer vectors on measured steps; config errors name the field."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from configs import default
from qtrain.analysis import kurtosis as kurt
from qtrain.analysis import telemetry
from qtrain.config import ConfigError, validate
from qtrain.layers import Transformer
from qtrain.optim import build_optimizer
from qtrain.parallel import Layout
from qtrain.train import abstract_params, init_state, state_shardings
from qtrain.train.build import build_model, model_config
from qtrain.train.step import make_measured_step, make_steps

# --- the statistic -------------------------------------------------------------


def np_kurtosis(x, mask=None):
  """OSP's formula in float64: raw 4th moment over population variance^2 - 3
  per token, clipped at 0, mean over real tokens; and max |x|."""
  x = np.asarray(x, np.float64)
  k = np.mean(x ** 4, -1) / np.var(x, -1) ** 2 - 3.0
  w = np.ones(k.shape) if mask is None else np.broadcast_to(mask, k.shape).astype(np.float64)
  return float(np.sum(np.maximum(k, 0) * w) / w.sum()), float(np.max(np.abs(x)[w > 0]))


@pytest.mark.parametrize("dist", ["normal", "laplace", "standard_t"])
def test_token_kurtosis_equals_scipy_on_zero_mean_tokens(dist):
  """With each token's mean removed the raw and centred 4th moments agree,
  so kappa_t is scipy.stats.kurtosis (Fisher, biased). float32 moments of
  1024 values vs SciPy's float64: rtol 1e-4 (student-t's heavy tail included)."""
  rng = np.random.default_rng(0)
  x = getattr(rng, dist)(size=(32, 1024), **({"df": 5} if dist == "standard_t" else {}))
  x = (x - x.mean(-1, keepdims=True)).astype(np.float32)
  want = scipy.stats.kurtosis(x.astype(np.float64), axis=-1, fisher=True, bias=True)
  np.testing.assert_allclose(np.asarray(kurt.token_kurtosis(x)), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(kurt.excess_kurtosis(x)), np.mean(np.maximum(want, 0)),
                             rtol=1e-4)


def test_known_distributions_gaussian_near_0_laplace_near_3():
  """256 tokens of 4096 values. Gaussian: kappa_t has sd sqrt(24/4096) = 0.077
  per token; clipping at 0 biases the token mean up to ~0.4 sd = 0.031, so
  |k| < 0.06. Laplace (excess 3): per-token sd ~0.8 (8th moment 2520 sigma^8),
  0.05 over 256 tokens, so |k - 3| < 0.25 (5 sd). SciPy on the same data
  gives the same within 0.01 (raw vs centred: means ~1/64 sd)."""
  rng = np.random.default_rng(1)
  gauss = rng.normal(size=(256, 4096)).astype(np.float32)
  lap = rng.laplace(size=(256, 4096)).astype(np.float32)
  kg, kl = float(kurt.excess_kurtosis(gauss)), float(kurt.excess_kurtosis(lap))
  assert 0.0 <= kg < 0.06, kg
  assert abs(kl - 3.0) < 0.25, kl
  for x, k in ((gauss, kg), (lap, kl)):
    ref = np.mean(np.maximum(scipy.stats.kurtosis(x.astype(np.float64), axis=-1), 0))
    assert abs(k - ref) < 0.01, (k, ref)


def test_raw_fourth_moment_padding_and_bf16_against_float64_formula():
  """Tokens with a mean offset (where raw and centred moments differ, so
  this pins OSP's raw moment: SciPy's centred value is far off), bf16
  input accumulated in float32, padding masked out (its huge values must not
  count). float32 vs float64 over 512 values: rtol 1e-4."""
  rng = np.random.default_rng(2)
  x = rng.standard_t(4, size=(4, 8, 512)) + rng.normal(size=(4, 8, 1)) * 2.0
  mask = np.ones((4, 8), bool)
  mask[:, 6:] = False
  x[:, 6:] *= 1e3  # Padding: would dominate max |x| and the mean if counted.
  xb = jnp.asarray(x, jnp.bfloat16)
  x64 = np.asarray(xb.astype(jnp.float32), np.float64)  # The bf16 values, exactly.
  k_ref, m_ref = np_kurtosis(x64, mask)
  # Compiled, as the telemetry step runs them (op by op, each op compiles alone).
  excess_kurtosis, max_abs, channel_mean_abs, abs_histogram = (jax.jit(f) for f in (
      kurt.excess_kurtosis, kurt.max_abs, kurt.channel_mean_abs, kurt.abs_histogram))
  np.testing.assert_allclose(float(excess_kurtosis(xb, mask)), k_ref, rtol=1e-4)
  np.testing.assert_allclose(float(max_abs(xb, mask)), m_ref, rtol=1e-6)
  centred = np.mean(np.maximum(scipy.stats.kurtosis(x64[mask], axis=-1), 0))
  assert abs(centred - k_ref) > 1.0  # The two definitions really differ here.
  real = x64[mask]
  np.testing.assert_allclose(np.asarray(channel_mean_abs(xb, mask)),
                             np.mean(np.abs(real), 0), rtol=1e-5)
  hist = np.histogram(np.abs(real), bins=np.append(kurt.HIST_EDGES, np.inf))[0]
  np.testing.assert_array_equal(np.asarray(abs_histogram(xb, mask)), hist)


# --- the telemetry step ----------------------------------------------------------


def _cfg(every=1, **model):
  cfg = default.get_config("smoke")
  cfg.telemetry.every = every
  cfg.model.update(**model)
  return cfg


def _batch(cfg, seed=0):
  b, t = cfg.data.global_batch_size, cfg.data.seq_len
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[:, 48:] = 0  # Padding at the end of every row: telemetry must skip it.
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
          "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "loss_mask": seg}


def _steps(cfg):
  """(layout, model, state, train_step, measured_step or None)."""
  validate(cfg, jax.device_count())
  model = build_model(cfg)
  layout = Layout.from_config(cfg)
  seq = cfg.data.seq_len
  with layout:
    tx = build_optimizer(cfg, abstract_params(model, seq))
    sh = state_shardings(model, tx, layout.mesh, seq)
    state = init_state(model, tx, layout.mesh, cfg.seed, seq)
    train, _ = make_steps(cfg, model, tx, layout.mesh, sh)
    measured = make_measured_step(cfg, model, tx, layout.mesh, sh)
  return layout, model, state, train, measured


@pytest.fixture(scope="module")
def built():
  """{telemetry.every: _steps(...)}, built once for the module's tests (each
  build traces the model and compiles its init; the jitted steps keep their
  executables across tests). The steps donate the state: steppers take a
  copy (`_fresh`)."""
  return {every: _steps(_cfg(every=every)) for every in (0, 1)}


def _fresh(state):
  return jax.tree.map(lambda x: x.copy(), state)


def test_telemetry_on_equals_off_in_loss_and_params(built):
  """Two steps of the measured step vs the plain step of a model without the
  provider, from the same state and batches: the loss, grad norm and the
  params after 2 steps are bit-identical (the statistics are read from
  stop_gradient'ed activations and never reach the objective; XLA keeps the
  loss and update arithmetic as it was), and the measured metrics are there."""
  off, on = built[0], built[1]
  assert off[4] is None and on[1].provider and not off[1].provider
  results = []
  for layout, _, state, train, measured in (off, on):
    step, state = measured or train, _fresh(state)
    ms = []
    with layout:
      for seed in (0, 1):
        state, m = step(state, _batch(_cfg(), seed))
        ms.append(jax.device_get(m))
    results.append((jax.device_get(state.params), ms))
  (p_off, m_off), (p_on, m_on) = results
  for a, b in zip(m_off, m_on):
    for k in ("loss", "grad_norm", "objective"):
      assert float(a[k]) == float(b[k]), k
    assert "telemetry/kurtosis" in b and not any(k.startswith("telemetry") for k in a)
  jax.tree.map(np.testing.assert_array_equal, p_off, p_on)


def test_logged_kurtosis_equals_kurtosis_of_captured_activations(built):
  """The measured step's per-layer metrics vs the float64 formula on the
  activations flax's capture_intermediates records for the same params and
  batch (a model without the provider): embedding output, every layer's
  output, the q/k/v input (attn_norm out), the down_proj input
  (silu(gate) * up), the lm_head input; padding excluded. float32 moments vs
  float64: rtol 2e-4."""
  cfg = _cfg(every=1)
  layout, _, state, _, measured = built[1]
  batch = _batch(cfg)
  params = jax.device_get(state.params)
  plain = Transformer(model_config(cfg))
  with layout:
    _, m = measured(_fresh(state), batch)
  m = jax.device_get(m)
  # Compiled: op by op, every op of the smoke model would compile on its own.
  _, inter = jax.jit(functools.partial(plain.apply, capture_intermediates=True,
                                       mutable=["intermediates"]))(
      {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
  inter = jax.device_get(inter["intermediates"])
  layers = inter["decoder"]["layers"]
  mask = batch["segment_ids"] > 0
  silu = lambda g: g / (1.0 + np.exp(-g))
  gate = np.asarray(layers["mlp"]["gate_proj"]["__call__"][0], np.float64)
  up = np.asarray(layers["mlp"]["up_proj"]["__call__"][0], np.float64)
  per_layer = {  # site -> [L, B, T, D]
      "decoder/layers/block_out": layers["__call__"][0][0],
      "decoder/layers/attn/q_proj": layers["attn_norm"]["__call__"][0],
      "decoder/layers/mlp/down_proj": silu(gate) * up,
  }
  n_layers = cfg.model.n_layers
  for site, acts in per_layer.items():
    for stat, i in (("kurtosis", 0), ("max_abs", 1)):
      got = m[f"telemetry/{stat}/{site}"]
      assert got.shape == (n_layers,)
      want = [np_kurtosis(acts[l], mask)[i] for l in range(n_layers)]
      np.testing.assert_allclose(got, want, rtol=2e-4, err_msg=f"{stat} {site}")
  emb = np.asarray(params["embedding"], np.float64)[batch["inputs"]]
  np.testing.assert_allclose(m["telemetry/kurtosis/embed_out"], np_kurtosis(emb, mask)[0],
                             rtol=2e-4)
  lm_in = inter["final_norm"]["__call__"][0]
  np.testing.assert_allclose(m["telemetry/kurtosis/lm_head"], np_kurtosis(lm_in, mask)[0],
                             rtol=2e-4)
  residual = [np_kurtosis(emb, mask)[0]] + [np_kurtosis(a, mask)[0]
                                           for a in per_layer["decoder/layers/block_out"]]
  np.testing.assert_allclose(m["telemetry/kurtosis"], np.mean(residual), rtol=2e-4)


def _flops(step, state, batch, layout):
  with layout:  # The lowered program (before XLA's optimizations) is what was traced.
    cost = step.lower(state, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"]


def test_unmeasured_step_costs_nothing(built):
  """The plain step of a telemetry config lowers to the FLOPs of the step
  without the provider, and the measured step to more (it really computes
  the statistics). The provider traces no statistic when the collection is
  immutable; with that check removed this still passes (tried): unused
  statistics are dropped before XLA sees them, as the design assumed."""
  batch = _batch(_cfg())
  l0, _, s0, train0, _ = built[0]
  l1, _, s1, train1, measured = built[1]
  f_off, f_plain, f_measured = (_flops(train0, s0, batch, l0), _flops(train1, s1, batch, l1),
                                _flops(measured, s1, batch, l1))
  assert f_plain == f_off, (f_plain, f_off)
  assert f_measured > f_off * 1.001, (f_measured, f_off)


def test_unscanned_layers_stack_into_the_same_metrics():
  """scan_layers=False sows per layers_<i> module; summarize restacks them
  into the [L] vectors a scanned model gives (same params -> same values)."""
  cfg_s, cfg_u = _cfg(), _cfg(scan_layers=False)
  model_s, model_u = build_model(cfg_s), build_model(cfg_u)
  batch = _batch(cfg_s)
  tok = jnp.asarray(batch["inputs"])
  params = jax.jit(model_s.init)(jax.random.key(0), tok)["params"]
  layers = params["decoder"]["layers"]
  unscanned = {**params, "decoder": {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], layers)
                                     for i in range(cfg_s.model.n_layers)}}
  from qtrain.train.sown import sown_metrics  # pylint: disable=g-import-not-at-top
  got = []
  for model, p in ((model_s, params), (model_u, unscanned)):
    apply = jax.jit(lambda p, b, model=model: telemetry.summarize(sown_metrics(model.apply(
        {"params": p}, b["inputs"], b["positions"], b["segment_ids"], mutable=["telemetry"])[1])))
    got.append(jax.device_get(apply(p, batch)))
  assert set(got[0]) == set(got[1])
  for k in got[0]:
    np.testing.assert_allclose(got[1][k], got[0][k], rtol=1e-5, err_msg=k)


# --- the loop and the config --------------------------------------------------------


def test_loop_logs_per_layer_telemetry_on_measured_steps(telemetry_runs_dir):
  """every=2, log_every=100, 4 steps (the session's telemetry run a,
  tests/conftest.py): rows at steps 1 (the initial params), 2 and 4 carry
  per-layer lists (the TensorBoard tags name/<i> come from the same rows),
  step 3's metrics are not logged."""
  run_dir = telemetry_runs_dir / "a"
  cfg = _cfg(every=2)
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  measured = [r["step"] for r in rows if "telemetry/kurtosis" in r]
  assert measured == [1, 2, 4]
  assert not any(r["step"] == 3 for r in rows)
  row = rows[-2] if "eval_loss" in rows[-1] else rows[-1]
  blocks = row["telemetry/kurtosis/decoder/layers/block_out"]
  assert len(blocks) == cfg.model.n_layers
  want = np.mean([row["telemetry/kurtosis/embed_out"], *blocks])
  np.testing.assert_allclose(row["telemetry/kurtosis"], want, rtol=1e-6)
  tb = list((run_dir / "tb").iterdir())
  assert tb and any(b"telemetry/kurtosis/decoder/layers/block_out/1" in f.read_bytes()
                    for f in tb)


@pytest.mark.parametrize("field, value, match", [
    ("every", -1, "config.telemetry.every=-1"),
    ("sites", ("embed_out", "blocks_out"), "config.telemetry.sites"),
    ("matmuls", "(", "config.telemetry.matmuls"),
])
def test_bad_telemetry_config_names_the_field(field, value, match):
  cfg = _cfg()
  cfg.telemetry[field] = value
  with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
    validate(cfg, jax.device_count())


def test_collecting_the_telemetry_collection_by_hand_is_refused():
  cfg = _cfg()
  cfg.train.collect = ("telemetry",)
  with pytest.raises(ConfigError, match="config.train.collect names 'telemetry'"):
    validate(cfg, jax.device_count())
