"""Config validation (in-process) and the optimizer builder against a float64
NumPy AdamW."""

import json
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default, llama_1b, llama_125m
from qtrain.config import ConfigError, validate
from qtrain.optim import build_optimizer, check_resume, decay_mask, learning_rate_schedule


@pytest.mark.parametrize("mod", [default, llama_125m, llama_1b])
@pytest.mark.parametrize("variant", ["", "smoke", "smoke,w4a4kv4", "smoke,w8a8+lm_head"])
def test_shipped_configs_validate(mod, variant):
  validate(mod.get_config(variant), n_devices=8)


def test_llama_1b_has_the_tinyllama_shape():
  m = llama_1b.get_config().model
  assert (m.n_layers, m.d_model, m.d_ff, m.n_heads, m.n_kv_heads, m.vocab_size,
          m.tie_embeddings) == (22, 2048, 5632, 32, 4, 32000, False)
  m = llama_125m.get_config().model
  assert (m.n_layers, m.d_model, m.d_ff, m.n_heads, m.vocab_size) == (12, 768, 2048, 12, 32000)


@pytest.mark.parametrize("edit, message", [
    (lambda c: setattr(c.model, "n_kv_heads", 3), "config.model.n_kv_heads=3 does not divide"),
    (lambda c: setattr(c.model, "head_dim", 15), "config.model.head_dim=15 must be even"),
    (lambda c: setattr(c.data, "global_batch_size", 12), "config.data.global_batch_size=12"),
    (lambda c: setattr(c.data, "seq_len", 1024), "config.data.seq_len=1024 exceeds"),
    (lambda c: setattr(c.train, "nan_policy", "ignore"), "config.train.nan_policy"),
    (lambda c: setattr(c.model, "remat_policy", "some"), "config.model.remat_policy"),
    (lambda c: setattr(c.optim, "warmup_steps", 10_000), "config.optim.warmup_steps"),
    (lambda c: setattr(c.optim, "decay_steps", -1), "config.optim.decay_steps=-1"),
    (lambda c: setattr(c.optim, "name", "adam"), "config.optim.name='adam' is not a registered"),
    (lambda c: setattr(c.optim.adamw, "mu_dtype", "int8"), "config.optim.adamw.mu_dtype='int8'"),
    (lambda c: setattr(c.optim.adamw, "b2", 1.0), "config.optim.adamw.b2=1.0"),
    (lambda c: setattr(c.optim, "groups", (dict(pattern="(", optimizer="adamw"),)),
     "config.optim.groups[0].pattern='('"),
    (lambda c: setattr(c.optim, "groups", (dict(pattern=".*", lr=2.0),)),
     "config.optim.groups[0].lr is not a group field"),
    (lambda c: setattr(c.optim, "groups", (dict(pattern=".*", optimizer="lion"),)),
     "config.optim.groups[0].optimizer='lion'"),
    (lambda c: setattr(c.train, "step", "zeroth"), "config.train.step='zeroth'"),
    (lambda c: setattr(c.train, "collect", ("intermediates", "")), "config.train.collect"),
    (lambda c: setattr(c.train, "collect", ("params",)), "config.train.collect names 'params'"),
])
def test_bad_values_name_the_field(edit, message):
  c = default.get_config()
  edit(c)
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(c, n_devices=8)


def test_unknown_key_suggests_the_close_one():
  c = default.get_config()
  c.unlock()
  c.model.n_head = 4
  with pytest.raises(ConfigError, match=r"config\.model\.n_head .*did you mean config\.model\.n_heads"):
    validate(c, n_devices=1)


def test_bad_quant_spec_fails_validation_naming_the_field():
  c = default.get_config("w4a4")
  c.quant.rules.linears.weight.bits = 1
  with pytest.raises(ConfigError, match=r"config\.quant\.rules\.linears\.weight\.bits=1"):
    validate(c, n_devices=1)


def test_schedule_is_linear_warmup_then_cosine():
  c = default.get_config()
  c.optim.update(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
  c.train.steps = 110  # decay_steps=0: the horizon is train.steps.
  sched = learning_rate_schedule(c)
  assert float(sched(0)) == 0.0
  assert math.isclose(float(sched(5)), 5e-4, rel_tol=1e-6)
  assert math.isclose(float(sched(10)), 1e-3, rel_tol=1e-6)
  mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 0.5))
  assert math.isclose(float(sched(60)), mid, rel_tol=1e-5)
  assert math.isclose(float(sched(110)), 1e-4, rel_tol=1e-5)
  # An explicit horizon does not move with train.steps; past it the rate stays final.
  c.optim.decay_steps, c.train.steps = 110, 500
  assert math.isclose(float(learning_rate_schedule(c)(60)), mid, rel_tol=1e-5)
  assert math.isclose(float(learning_rate_schedule(c)(300)), 1e-4, rel_tol=1e-5)


def test_decay_mask_by_path():
  params = {"embedding": 0, "final_norm": {"scale": 0},
            "decoder": {"layers": {"attn": {"q_proj": {"kernel": 0}},
                                   "attn_norm": {"scale": 0}}},
            "lm_head": {"kernel": 0, "dot_general": {"weight_step": 0}}}
  mask = decay_mask(params, default.get_config().optim.no_decay)
  assert mask["embedding"] is False and mask["final_norm"]["scale"] is False
  assert mask["decoder"]["layers"]["attn_norm"]["scale"] is False
  assert mask["decoder"]["layers"]["attn"]["q_proj"]["kernel"] is True
  assert mask["lm_head"]["kernel"] is True
  assert mask["lm_head"]["dot_general"]["weight_step"] is False


def _optim_cfg(**optim):
  c = default.get_config()
  c.train.steps = 10
  c.optim.update(lr=1e-2, warmup_steps=1, weight_decay=0.1, grad_clip=0.0)
  c.optim.update(**optim)
  return c


def _abstract(params):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), params)


def _numpy_adamw(cfg, params, grads, mults):
  """AdamW in float64 (Loshchilov & Hutter 2019: decoupled decay, masked),
  after clip_by_global_norm over all params (Pascanu et al. 2013) when
  ``cfg.optim.grad_clip > 0``. ``mults[name] = (lr_mult, wd_mult, decays)``."""
  o, a = cfg.optim, cfg.optim.adamw
  sched = learning_rate_schedule(cfg)
  ref = {k: np.array(v, np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in ref.items()}
  nu = {k: np.zeros_like(v) for k, v in ref.items()}
  for t, g in enumerate(grads, start=1):
    norm = np.sqrt(sum(np.sum(np.square(x)) for x in g.values()))
    scale = min(1.0, o.grad_clip / norm) if o.grad_clip > 0 else 1.0
    lr = float(sched(t - 1))
    for k in ref:
      lr_mult, wd_mult, decays = mults[k]
      gk = g[k] * scale
      mu[k] = a.b1 * mu[k] + (1 - a.b1) * gk
      nu[k] = a.b2 * nu[k] + (1 - a.b2) * gk ** 2
      step = (mu[k] / (1 - a.b1 ** t)) / (np.sqrt(nu[k] / (1 - a.b2 ** t)) + a.eps)
      if decays:
        step = step + o.weight_decay * wd_mult * ref[k]
      ref[k] = ref[k] - lr * lr_mult * step
  return ref


def _run_tx(tx, params, grads):
  p32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(p32)
  for g in grads:
    upd, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p32)
    p32 = jax.tree.map(lambda a, b: a + b, p32, upd)
  return p32


def test_adamw_steps_match_float64_numpy():
  """Three steps of the built optimizer vs AdamW written out in float64;
  float32 state, so agreement to ~1e-6 relative."""
  c = _optim_cfg()
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(4, 3)), "final_norm": rng.normal(size=(3,))}
  grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(3)]
  got = _run_tx(build_optimizer(c, _abstract(params)), params, grads)
  ref = _numpy_adamw(c, params, grads, {"w": (1.0, 1.0, True), "final_norm": (1.0, 1.0, False)})
  for k in params:
    np.testing.assert_allclose(np.asarray(got[k]), ref[k], rtol=1e-5, atol=1e-6)


def test_clipping_and_groups_match_float64_numpy():
  """Two steps with the global-norm clip active (gradients of norm ~40 vs
  grad_clip=1) and two groups with lr/wd multipliers, vs float64 NumPy.
  Tolerance: float32 Adam moments and clip scale, ~1e-6 relative; a missing
  clip (or a per-group clip) would be off by O(1) in the second moment's
  normalisation of the first step and by lr-scale amounts after."""
  c = _optim_cfg(grad_clip=1.0, groups=(dict(pattern="emb.*", lr_mult=0.5, wd_mult=0.0),
                                        dict(pattern=".*", optimizer="adamw", lr_mult=2.0)))
  rng = np.random.default_rng(1)
  params = {"emb": rng.normal(size=(5, 3)), "w": rng.normal(size=(3, 4)),
            "norm": rng.normal(size=(4,))}
  grads = [{k: 10 * rng.normal(size=v.shape) for k, v in params.items()} for _ in range(2)]
  got = _run_tx(build_optimizer(c, _abstract(params)), params, grads)
  ref = _numpy_adamw(c, params, grads, {"emb": (0.5, 0.0, True), "w": (2.0, 1.0, True),
                                        "norm": (2.0, 1.0, False)})
  for k in params:
    np.testing.assert_allclose(np.asarray(got[k]), ref[k], rtol=2e-5, atol=1e-6)


def test_every_param_needs_a_group_and_unused_rules_are_reported(capsys):
  params = {"decoder": {"w": np.zeros((2, 2))}, "embedding": np.zeros((3, 2)),
            "lm_head": {"kernel": np.zeros((2, 3))}}
  c = _optim_cfg(groups=(dict(pattern="decoder/.*"),))
  with pytest.raises(ConfigError, match=r"no rule for 2 params: embedding, lm_head/kernel"):
    build_optimizer(c, _abstract(params))
  c.optim.groups = (dict(pattern="decoder/.*"), dict(pattern="lm_head/.*", optimizer="frozen"),
                    dict(pattern="nothing"), dict(pattern=".*"))
  tx = build_optimizer(c, _abstract(params))
  assert "config.optim.groups[2] (pattern 'nothing') matched no param" in capsys.readouterr().err
  # The frozen group never moves; the others do.
  grads = [jax.tree.map(np.ones_like, params)] * 3
  got = _run_tx(tx, jax.tree.map(lambda x: x + 1.0, params), grads)
  assert np.all(np.asarray(got["lm_head"]["kernel"]) == 1.0)
  assert np.all(np.asarray(got["decoder"]["w"]) < 1.0)


def test_resume_with_a_changed_cosine_horizon_fails_naming_the_fix():
  # As the loop reads it back: config.json (tuples become lists).
  saved = ml_collections.ConfigDict(json.loads(default.get_config("smoke").to_json()))
  longer = default.get_config("smoke")
  longer.train.steps = saved.train.steps + 10
  with pytest.raises(ConfigError, match=rf"config\.optim\.decay_steps.*spans {saved.train.steps} "
                     rf"updates.*--config\.optim\.decay_steps={saved.train.steps}"):
    check_resume(saved, longer)
  longer.optim.decay_steps = saved.train.steps  # The suggested fix.
  check_resume(saved, longer)
  check_resume(saved, default.get_config("smoke"))
  other = default.get_config("smoke")
  other.optim.groups = (dict(pattern=".*", optimizer="frozen"),)
  with pytest.raises(ConfigError, match=r"config\.optim\.name/groups"):
    check_resume(saved, other)


def test_resume_refuses_turning_restarts_on():
  """The restarts wrapper adds state around the groups': a checkpoint saved
  without it cannot be restored into it."""
  saved = default.get_config()
  wrapped = default.get_config()
  wrapped.optim.restarts.every = 50
  check_resume(saved, default.get_config())
  with pytest.raises(ConfigError, match=r"restarts\.every>0"):
    check_resume(saved, wrapped)
